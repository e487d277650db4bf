/*
 * lineload: a C-speed load generator for line protocol v1 (see SPEC.md).
 *
 * What it is for: the reference the benchmarks compare against. One thread,
 * epoll, non-blocking sockets, no allocation per request, so on loopback it
 * is far from being the bottleneck of a Python server. Each of -c connections
 * keeps -P messages in flight (1 = classic request/response); a response is a
 * REPLY line followed by its ACK line, or one ERR line. With --per-request
 * every message opens its own connection (connect, send, reply, close).
 *
 * It prints one JSON object: requests, errors, seconds, rps, bytes_in, and
 * latency (send until the response is complete, i.e. rtt) percentiles in ms
 * from a 1-microsecond-resolution histogram.
 *
 * What it is not: a verifier. It counts REPLY/ACK/ERR units; the Python
 * stress tool checks every reply's content.
 *
 * Build: cc -O2 -o lineload lineload.c   (make bench-tools)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_PIPE 1024
#define HIST_US 2000000 /* 2 s at 1 us resolution; slower goes to the last bucket */

struct conn {
    int fd;
    int connecting;
    int inflight;
    int expect_ack;        /* the next line is the ACK of a REPLY */
    int at_line_start;
    char prefix[6];        /* first bytes of the current line */
    int prefix_len;
    uint64_t sent_at[MAX_PIPE];
    int head, tail;        /* ring of send times */
    size_t wpos;           /* bytes of the current batch already written */
    size_t wlen;
    unsigned events;       /* what epoll watches now: changed only when needed */
};

static const char *host = "127.0.0.1";
static int port = 7000, nconns = 10, pipeline = 1, size = 64, per_request = 0;
static double seconds = 5.0, warmup = 0.0;
static long long limit_requests = 0;
static char *msg;
static size_t msg_len;
static char *batch;
static uint32_t *hist;
static uint64_t hist_max_us;
static long long done_requests, errors, bytes_in, measured;
static int measuring;
static struct sockaddr_in addr;
static int ep;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

static void record(uint64_t ns) {
    uint64_t us = ns / 1000;
    if (us > hist_max_us) hist_max_us = us;
    if (us >= HIST_US) us = HIST_US - 1;
    hist[us]++;
}

static int open_conn(struct conn *c) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (fd < 0) return -1;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    /* Its TIME_WAIT (this side closes first) then keeps no server from binding
       the local port: see clusterkit/sockets.py. */
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    int r = connect(fd, (struct sockaddr *)&addr, sizeof addr);
    if (r < 0 && errno != EINPROGRESS) { close(fd); return -1; }
    c->fd = fd;
    c->connecting = 1;
    c->inflight = 0;
    c->expect_ack = 0;
    c->at_line_start = 1;
    c->prefix_len = 0;
    c->head = c->tail = 0;
    c->wpos = c->wlen = 0;
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    c->events = EPOLLIN | EPOLLOUT;
    return 0;
}

static void close_conn(struct conn *c) {
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->fd = -1;
}

/* Queue `n` messages for sending (their send time is the write attempt). */
static void send_msgs(struct conn *c, int n) {
    uint64_t t = now_ns();
    for (int i = 0; i < n; i++) {
        c->sent_at[c->tail] = t;
        c->tail = (c->tail + 1) % MAX_PIPE;
    }
    c->inflight += n;
    c->wlen += (size_t)n * msg_len;
}

static int flush_out(struct conn *c) {
    while (c->wpos < c->wlen) {
        size_t remaining = c->wlen - c->wpos;
        size_t off = c->wpos % msg_len;
        size_t chunk = remaining < (size_t)pipeline * msg_len - off ? remaining : (size_t)pipeline * msg_len - off;
        ssize_t w = send(c->fd, batch + off, chunk, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EAGAIN) return 0;
            return -1;
        }
        c->wpos += (size_t)w;
    }
    c->wpos = c->wlen = 0;
    return 0;
}

static int budget_left(void) {
    return limit_requests == 0 || done_requests + errors < limit_requests;
}

static void restart(struct conn *c, int failed_inflight) {
    errors += failed_inflight;
    close_conn(c);
    if (budget_left()) {
        if (open_conn(c) < 0) errors++;
    }
}

/* One complete response arrived. */
static void complete(struct conn *c, int is_error) {
    uint64_t t = now_ns();
    uint64_t sent = c->sent_at[c->head];
    c->head = (c->head + 1) % MAX_PIPE;
    c->inflight--;
    if (is_error) errors++;
    else {
        done_requests++;
        if (measuring) { record(t - sent); measured++; }
    }
}

static int handle_read(struct conn *c) {
    char buf[65536];
    for (;;) {
        ssize_t r = recv(c->fd, buf, sizeof buf, 0);
        if (r == 0) return -1;
        if (r < 0) return errno == EAGAIN ? 0 : -1;
        bytes_in += r;
        char *p = buf, *end = buf + r;
        while (p < end) {
            if (c->at_line_start || c->prefix_len < 6) {
                /* collect the first bytes of the line */
                while (p < end && c->prefix_len < 6 && *p != '\n') c->prefix[c->prefix_len++] = *p++;
                c->at_line_start = 0;
                if (p >= end) break;
            }
            char *nl = memchr(p, '\n', (size_t)(end - p));
            if (!nl) { p = end; break; }
            p = nl + 1;
            /* a whole line ended */
            if (c->expect_ack) {
                c->expect_ack = 0;
                complete(c, strncmp(c->prefix, "ACK ", 4) != 0);
            } else if (c->prefix_len >= 6 && memcmp(c->prefix, "REPLY ", 6) == 0) {
                c->expect_ack = 1;
            } else {
                complete(c, 1); /* ERR or garbage */
            }
            c->at_line_start = 1;
            c->prefix_len = 0;
            if (c->inflight == 0 && per_request) return 1;
        }
        /* A short read means the socket is drained: skip the recv that would
           only say EAGAIN (level-triggered epoll reports any later data). */
        if ((size_t)r < sizeof buf) return 0;
    }
}

static void usage(void) {
    fprintf(stderr,
            "usage: lineload [--host H] [--port P] [-c CONNS] [-d SECONDS] [-n REQUESTS] [-s SIZE]\n"
            "                [-P PIPELINE] [-w WARMUP_SECONDS] [--per-request]\n");
    exit(2);
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
#define NEXT (i + 1 < argc ? argv[++i] : (usage(), ""))
        if (!strcmp(a, "--host")) host = NEXT;
        else if (!strcmp(a, "--port") || !strcmp(a, "-p")) port = atoi(NEXT);
        else if (!strcmp(a, "-c")) nconns = atoi(NEXT);
        else if (!strcmp(a, "-d")) seconds = atof(NEXT);
        else if (!strcmp(a, "-n")) limit_requests = atoll(NEXT);
        else if (!strcmp(a, "-s")) size = atoi(NEXT);
        else if (!strcmp(a, "-P")) pipeline = atoi(NEXT);
        else if (!strcmp(a, "-w")) warmup = atof(NEXT);
        else if (!strcmp(a, "--per-request")) per_request = 1;
        else usage();
    }
    if (nconns < 1 || pipeline < 1 || pipeline > MAX_PIPE || size < 0 || seconds <= 0) usage();
    if (per_request) pipeline = 1;
    msg_len = (size_t)size + 1;
    msg = malloc(msg_len);
    memset(msg, 'x', (size_t)size);
    msg[size] = '\n';
    batch = malloc(msg_len * (size_t)pipeline);
    for (int i = 0; i < pipeline; i++) memcpy(batch + i * msg_len, msg, msg_len);
    hist = calloc(HIST_US, sizeof *hist);
    addr.sin_family = AF_INET;
    addr.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, host, &addr.sin_addr) != 1) { fprintf(stderr, "lineload: bad IPv4 host %s\n", host); return 2; }

    ep = epoll_create1(0);
    struct conn *conns = calloc((size_t)nconns, sizeof *conns);
    for (int i = 0; i < nconns; i++)
        if (open_conn(&conns[i]) < 0) { fprintf(stderr, "lineload: socket: %s\n", strerror(errno)); return 1; }

    uint64_t start = now_ns();
    uint64_t measure_start = start + (uint64_t)(warmup * 1e9);
    uint64_t stop = measure_start + (uint64_t)(seconds * 1e9);
    measuring = warmup <= 0;
    long long done_at_measure = 0, err_at_measure = 0, bytes_at_measure = 0;
    struct epoll_event evs[256];
    int live = nconns;
    while (live > 0) {
        uint64_t t = now_ns();
        if (!measuring && t >= measure_start) {
            measuring = 1;
            done_at_measure = done_requests; err_at_measure = errors; bytes_at_measure = bytes_in;
        }
        if (t >= stop) break;
        if (limit_requests && done_requests + errors >= limit_requests) break;
        int n = epoll_wait(ep, evs, 256, 100);
        for (int k = 0; k < n; k++) {
            struct conn *c = evs[k].data.ptr;
            if (c->fd < 0) continue;
            if (evs[k].events & (EPOLLERR | EPOLLHUP) && c->connecting) { restart(c, 1); continue; }
            if (c->connecting && (evs[k].events & EPOLLOUT)) {
                int err = 0; socklen_t len = sizeof err;
                getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
                if (err) { restart(c, 1); continue; }
                c->connecting = 0;
                send_msgs(c, pipeline);
                if (flush_out(c) < 0) { restart(c, c->inflight); continue; }
            } else if (evs[k].events & EPOLLOUT) {
                if (flush_out(c) < 0) { restart(c, c->inflight); continue; }
            }
            if (evs[k].events & EPOLLIN) {
                int r = handle_read(c);
                if (r < 0) { restart(c, c->inflight); continue; }
                if (r == 1) { /* per-request: this connection's message is answered */
                    close_conn(c);
                    if (budget_left() && open_conn(c) < 0) errors++;
                    continue;
                }
                int want = pipeline - c->inflight;
                if (want > 0 && budget_left()) {
                    send_msgs(c, want);
                    if (flush_out(c) < 0) { restart(c, c->inflight); continue; }
                }
            }
            /* keep EPOLLOUT armed only while a write is pending */
            unsigned want = EPOLLIN | (c->wpos < c->wlen ? EPOLLOUT : 0);
            if (c->fd >= 0 && !c->connecting && want != c->events) {
                struct epoll_event ev = {.events = want, .data.ptr = c};
                epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
                c->events = want;
            }
        }
        live = 0;
        for (int i = 0; i < nconns; i++) live += conns[i].fd >= 0;
    }
    uint64_t end = now_ns();
    double elapsed = (double)(end - (warmup > 0 ? measure_start : start)) / 1e9;
    if (!measuring) elapsed = 0;
    long long reqs = done_requests - done_at_measure, errs = errors - err_at_measure;
    double pct[5] = {50, 90, 99, 99.9, 100};
    double val[5] = {0};
    long long seen = 0; int pi = 0;
    for (uint32_t us = 0; us < HIST_US && pi < 5 && measured > 0; us++) {
        seen += hist[us];
        while (pi < 5 && seen >= (long long)((pct[pi] / 100.0) * (double)measured + 0.999999)) {
            val[pi] = us / 1000.0;
            pi++;
        }
    }
    val[4] = hist_max_us / 1000.0;
    printf("{\"tool\": \"lineload\", \"connections\": %d, \"pipeline\": %d, \"size\": %d, \"per_request\": %s, "
           "\"requests\": %lld, \"errors\": %lld, \"seconds\": %.6f, \"rps\": %.1f, \"bytes_in\": %lld, "
           "\"p50_ms\": %.3f, \"p90_ms\": %.3f, \"p99_ms\": %.3f, \"p999_ms\": %.3f, \"max_ms\": %.3f}\n",
           nconns, pipeline, size, per_request ? "true" : "false", reqs, errs, elapsed,
           elapsed > 0 ? reqs / elapsed : 0.0, bytes_in - bytes_at_measure,
           val[0], val[1], val[2], val[3], val[4]);
    return 0;
}
