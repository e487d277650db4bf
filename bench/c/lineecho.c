/*
 * lineecho: a C echo server of line protocol v1, for the benchmarks only.
 *
 * What it is for: a target known to be faster than any Python server, so the
 * benchmark can check that the stress tool ranks servers the way a C load
 * generator does. One thread, epoll, level-triggered, non-blocking sockets.
 * For each line M it writes "REPLY <name> M\n" and "ACK <name> <len>\n"; a
 * '\r' before '\n' is dropped; a line longer than 65536 bytes gets
 * "ERR line-too-long" and a close; bytes after the last '\n' at the client's
 * EOF get "ERR incomplete-line".
 *
 * What it is not: a server to deploy. No logging, no timeouts, no graceful
 * stop (SIGTERM ends it at once).
 *
 * Build: cc -O2 -o lineecho lineecho.c   (make bench-tools)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_LINE 65536

struct conn {
    int fd;
    char *in;      /* unfinished line */
    size_t in_len, in_cap;
    char *out;     /* replies not yet written */
    size_t out_len, out_pos, out_cap;
    int closing;
    unsigned events; /* what epoll watches now: changed only when needed */
};

static const char *name = "cecho";
static size_t name_len;

static void reserve(char **buf, size_t *cap, size_t need) {
    if (need <= *cap) return;
    size_t c = *cap ? *cap : 4096;
    while (c < need) c *= 2;
    *buf = realloc(*buf, c);
    *cap = c;
}

static void append(struct conn *c, const char *p, size_t n) {
    reserve(&c->out, &c->out_cap, c->out_len + n);
    memcpy(c->out + c->out_len, p, n);
    c->out_len += n;
}

static void reply(struct conn *c, const char *m, size_t len) {
    if (len && m[len - 1] == '\r') len--;
    char num[32];
    int k = snprintf(num, sizeof num, " %zu\n", len);
    append(c, "REPLY ", 6); append(c, name, name_len); append(c, " ", 1); append(c, m, len);
    append(c, "\nACK ", 5); append(c, name, name_len); append(c, num, (size_t)k);
}

static void conn_free(int ep, struct conn *c) {
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c->in); free(c->out); free(c);
}

/* returns -1 when the connection should be dropped now */
static int flush(struct conn *c) {
    while (c->out_pos < c->out_len) {
        ssize_t w = send(c->fd, c->out + c->out_pos, c->out_len - c->out_pos, MSG_NOSIGNAL);
        if (w < 0) return errno == EAGAIN ? 0 : -1;
        c->out_pos += (size_t)w;
    }
    c->out_pos = c->out_len = 0;
    return c->closing ? -1 : 0;
}

static int on_read(struct conn *c) {
    char buf[65536];
    ssize_t r = recv(c->fd, buf, sizeof buf, 0);
    if (r == 0) {  /* the client is done: bytes after its last '\n' are no message */
        if (c->in_len) append(c, "ERR incomplete-line\n", 20);
        c->closing = 1;
        return 0;
    }
    if (r < 0) return errno == EAGAIN ? 0 : -1;
    char *p = buf, *end = buf + r;
    while (p < end) {
        char *nl = memchr(p, '\n', (size_t)(end - p));
        if (!nl) {
            if (c->in_len + (size_t)(end - p) > MAX_LINE + 1) goto too_long;
            reserve(&c->in, &c->in_cap, c->in_len + (size_t)(end - p));
            memcpy(c->in + c->in_len, p, (size_t)(end - p));
            c->in_len += (size_t)(end - p);
            break;
        }
        size_t n = (size_t)(nl - p);
        if (c->in_len) {
            size_t all = c->in_len + n;
            char last = n ? p[n - 1] : c->in[c->in_len - 1];
            if (all > MAX_LINE + 1 || (all == MAX_LINE + 1 && last != '\r')) goto too_long;
            reserve(&c->in, &c->in_cap, all);
            memcpy(c->in + c->in_len, p, n);
            reply(c, c->in, all);
            c->in_len = 0;
        } else {
            if (n > MAX_LINE + 1 || (n == MAX_LINE + 1 && p[n - 1] != '\r')) goto too_long;
            reply(c, p, n);
        }
        p = nl + 1;
    }
    return 0;
too_long:
    append(c, "ERR line-too-long\n", 18);
    c->closing = 1;
    return 0;
}

int main(int argc, char **argv) {
    const char *host = "127.0.0.1";
    int port = 7001;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--host")) host = argv[i + 1];
        else if (!strcmp(argv[i], "--port")) port = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--name")) name = argv[i + 1];
        else { fprintf(stderr, "usage: lineecho [--host H] [--port P] [--name NAME]\n"); return 2; }
    }
    name_len = strlen(name);
    int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    inet_pton(AF_INET, host, &addr.sin_addr);
    if (bind(ls, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(ls, 4096) < 0) {
        fprintf(stderr, "lineecho: cannot listen on %s:%d: %s\n", host, port, strerror(errno));
        return 71;
    }
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, ls, &ev);
    struct epoll_event evs[256];
    for (;;) {
        int n = epoll_wait(ep, evs, 256, -1);
        for (int k = 0; k < n; k++) {
            struct conn *c = evs[k].data.ptr;
            if (!c) {
                int fd;
                while ((fd = accept4(ls, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    struct conn *nc = calloc(1, sizeof *nc);
                    nc->fd = fd;
                    nc->events = EPOLLIN;
                    struct epoll_event e = {.events = EPOLLIN, .data.ptr = nc};
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &e);
                }
                continue;
            }
            if (evs[k].events & (EPOLLERR | EPOLLHUP) && !(evs[k].events & EPOLLIN)) { conn_free(ep, c); continue; }
            if ((evs[k].events & EPOLLIN) && !c->closing && on_read(c) < 0) { conn_free(ep, c); continue; }
            if (flush(c) < 0) { conn_free(ep, c); continue; }
            int full = c->out_len - c->out_pos > (1u << 20); /* the client does not read: stop reading too */
            unsigned want = (c->closing || full ? 0 : EPOLLIN) | (c->out_len ? EPOLLOUT : 0);
            if (want != c->events) {
                struct epoll_event e = {.events = want, .data.ptr = c};
                epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &e);
                c->events = want;
            }
        }
    }
}
