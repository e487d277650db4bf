#!/usr/bin/env bash
# Installs the system programs the tests and benchmarks drive, from Debian's
# packages, when they are missing and we are root. Otherwise it says what is
# missing; the tests that need a missing tool skip with that reason.
set -u
want=()
command -v ab >/dev/null 2>&1       || want+=(apache2-utils)
command -v chromium >/dev/null 2>&1 || want+=(chromium)
if [ "${1:-}" = "--bench" ]; then
  command -v wrk >/dev/null 2>&1     || want+=(wrk)
  command -v nginx >/dev/null 2>&1   || want+=(nginx-light)
  command -v haproxy >/dev/null 2>&1 || want+=(haproxy)
fi
[ ${#want[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "note: please install ${want[*]} (Debian packages); tests that need them will skip" >&2
  exit 0
fi
echo "installing ${want[*]} from Debian's packages ..." >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null 2>&1 || true
if ! apt-get install -y -qq --no-install-recommends "${want[@]}" >/dev/null 2>&1; then
  # Install one by one so that one unavailable package does not block the rest.
  for p in "${want[@]}"; do
    apt-get install -y -qq --no-install-recommends "$p" >/dev/null 2>&1 \
      || echo "note: could not install $p; tests that need it will skip" >&2
  done
fi
exit 0
