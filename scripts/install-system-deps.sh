#!/usr/bin/env bash
# Installs the system programs the tests and benchmarks drive, from Debian's
# packages, when they are missing and we are root. Otherwise it says what is
# missing; the tests that need a missing tool skip with that reason.
set -u
want=()
if [ "${1:-}" = "--venv" ]; then
  # Only what `python3 -m venv` needs on Debian (ensurepip), for the Makefile's venv step.
  python3 -c 'import ensurepip' >/dev/null 2>&1 && exit 0
  want+=("python3-venv" "python$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')-venv")
else
  command -v ab >/dev/null 2>&1       || want+=(apache2-utils)
  command -v chromium >/dev/null 2>&1 || want+=(chromium)
fi
if [ "${1:-}" = "--bench" ]; then
  command -v wrk >/dev/null 2>&1     || want+=(wrk)
  command -v nginx >/dev/null 2>&1   || want+=(nginx-light)
  command -v haproxy >/dev/null 2>&1 || want+=(haproxy)
fi
[ ${#want[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  if [ "${1:-}" = "--venv" ]; then
    echo "note: python3 cannot make a virtual environment here: please install ${want[0]} (Debian)" >&2
  else
    echo "note: please install ${want[*]} (Debian packages); tests that need them will skip" >&2
  fi
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
