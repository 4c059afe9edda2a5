/*
 * loadgen: the bounded load generators of benchmarks/forwarder_vs_haproxy.py
 * that Debian does not ship (wrk, which it does ship, is closed-loop).
 *
 *   loadgen paced-tcp HOST PORT RATE COUNT TIMEOUT_MS
 *       Open loop: connection i is opened at t0 + i/RATE s, whatever happened
 *       to earlier ones, sends "GET / HTTP/1.1\r\nHost: bench\r\nConnection:
 *       close\r\n\r\n" and reads until the server closes. Its latency runs
 *       from its *scheduled* start to that close (connect + request +
 *       response), so a stall is charged to every connection it delays
 *       (no coordinated omission). A reply not starting "HTTP/1.1 200" is an
 *       error. At most MAX_INFLIGHT connections are open at once; one that
 *       would exceed that is counted as not_started. A connection open longer
 *       than TIMEOUT_MS is closed and counted as a timeout. Prints one JSON
 *       object: counts and latency percentiles in microseconds.
 *
 *   loadgen udp-echo-server HOST PORT MAX_SECONDS
 *       Sends every datagram back to its sender (recvmmsg/sendmmsg, 64 at a
 *       time). Prints "ready PORT" once bound (PORT 0 picks a free port).
 *       Exits after MAX_SECONDS, or on SIGTERM/SIGINT.
 *
 *   loadgen udp-flood HOST PORT FLOWS SIZE WINDOW SECONDS
 *       FLOWS connected UDP sockets (distinct source ports, so distinct
 *       flows), each keeping WINDOW datagrams of SIZE bytes in flight: every
 *       echo received releases the next datagram. A flow that hears nothing
 *       for 20 ms is taken to have lost its window and sends a new one.
 *       Runs SECONDS s; prints one JSON object with datagrams sent and
 *       echoes received.
 *
 * Only loopback destinations are accepted (127.0.0.0/8). Build:
 *   gcc -O2 -Wall -Wextra -o loadgen benchmarks/loadgen.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define MAX_INFLIGHT 20000
#define MAX_COUNT 5000000L
#define BATCH 64

static const char REQUEST[] = "GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n";

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void die(const char *what) {
    perror(what);
    exit(2);
}

static struct sockaddr_in loopback_address(const char *host, const char *port) {
    struct sockaddr_in sa;
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)atoi(port));
    if (inet_pton(AF_INET, host, &sa.sin_addr) != 1) {
        fprintf(stderr, "loadgen: %s is not an IPv4 address\n", host);
        exit(2);
    }
    if ((ntohl(sa.sin_addr.s_addr) >> 24) != 127) {
        fprintf(stderr, "loadgen: %s is not a loopback address (127.0.0.0/8)\n", host);
        exit(2);
    }
    return sa;
}

/* ------------------------------------------------------------ paced-tcp */

enum { FREE = 0, CONNECTING, READING, DONE };

struct conn {
    int fd;
    int state;
    int got;        /* bytes of the status line seen (up to 12) */
    char head[12];
};

static int cmp_i64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

static double percentile_us(const int64_t *sorted, long n, double p) {
    if (n == 0) return -1.0;
    long idx = (long)(p / 100.0 * (double)(n - 1) + 0.5);
    return (double)sorted[idx] / 1000.0;
}

static int paced_tcp(int argc, char **argv) {
    if (argc != 7) {
        fprintf(stderr, "usage: loadgen paced-tcp HOST PORT RATE COUNT TIMEOUT_MS\n");
        return 2;
    }
    struct sockaddr_in sa = loopback_address(argv[2], argv[3]);
    double rate = atof(argv[4]);
    long count = atol(argv[5]);
    int64_t timeout_ns = (int64_t)atol(argv[6]) * 1000000LL;
    if (rate <= 0 || count <= 0 || count > MAX_COUNT || timeout_ns <= 0) {
        fprintf(stderr, "loadgen: need RATE > 0, 0 < COUNT <= %ld, TIMEOUT_MS > 0\n", MAX_COUNT);
        return 2;
    }
    int64_t interval = (int64_t)(1e9 / rate);
    struct conn *conns = calloc((size_t)count, sizeof *conns);
    int64_t *latency = calloc((size_t)count, sizeof *latency);
    if (!conns || !latency) die("calloc");
    int ep = epoll_create1(0);
    int tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK);
    if (ep < 0 || tfd < 0) die("epoll/timerfd");
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = UINT64_MAX};
    epoll_ctl(ep, EPOLL_CTL_ADD, tfd, &ev);

    long next = 0, oldest = 0, finished = 0, ok = 0, errors = 0, timeouts = 0,
         not_started = 0, inflight = 0, n_lat = 0;
    int64_t t0 = now_ns() + 10000000LL;
    struct epoll_event events[256];
    while (finished < count) {
        int64_t now = now_ns();
        /* Start every connection whose time has come. */
        while (next < count && t0 + next * interval <= now) {
            long i = next++;
            if (inflight >= MAX_INFLIGHT) {
                not_started++;
                finished++;
                conns[i].state = DONE;
                continue;
            }
            int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
            if (fd < 0) {
                errors++;
                finished++;
                conns[i].state = DONE;
                continue;
            }
            int one = 1;
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
            conns[i].fd = fd;
            conns[i].state = CONNECTING;
            inflight++;
            if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0 && errno != EINPROGRESS) {
                close(fd);
                conns[i].state = DONE;
                inflight--;
                errors++;
                finished++;
                continue;
            }
            struct epoll_event cev = {.events = EPOLLOUT, .data.u64 = (uint64_t)i};
            epoll_ctl(ep, EPOLL_CTL_ADD, fd, &cev);
        }
        /* Time out the oldest connections (they started first). */
        while (oldest < next) {
            struct conn *c = &conns[oldest];
            if (c->state == DONE) {
                oldest++;
                continue;
            }
            if (t0 + oldest * interval + timeout_ns > now) break;
            close(c->fd);
            c->state = DONE;
            inflight--;
            timeouts++;
            finished++;
            oldest++;
        }
        if (finished >= count) break;
        int64_t wake = INT64_MAX;
        if (next < count) wake = t0 + next * interval;
        if (oldest < next) {
            int64_t deadline = t0 + oldest * interval + timeout_ns;
            if (deadline < wake) wake = deadline;
        }
        struct itimerspec its = {0};
        if (wake != INT64_MAX) {
            if (wake <= now) wake = now + 1000;
            its.it_value.tv_sec = wake / 1000000000LL;
            its.it_value.tv_nsec = wake % 1000000000LL;
            timerfd_settime(tfd, TFD_TIMER_ABSTIME, &its, NULL);
        }
        int n = epoll_wait(ep, events, 256, -1);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        for (int k = 0; k < n; k++) {
            if (events[k].data.u64 == UINT64_MAX) {
                uint64_t expirations;
                ssize_t r = read(tfd, &expirations, sizeof expirations);
                (void)r;
                continue;
            }
            long i = (long)events[k].data.u64;
            struct conn *c = &conns[i];
            if (c->state == CONNECTING) {
                int err = 0;
                socklen_t len = sizeof err;
                getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
                if (err == 0 && send(c->fd, REQUEST, sizeof REQUEST - 1, MSG_NOSIGNAL) ==
                                    (ssize_t)(sizeof REQUEST - 1)) {
                    c->state = READING;
                    struct epoll_event rev = {.events = EPOLLIN | EPOLLRDHUP, .data.u64 = (uint64_t)i};
                    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &rev);
                    continue;
                }
                close(c->fd);
                c->state = DONE;
                inflight--;
                errors++;
                finished++;
                continue;
            }
            if (c->state != READING) continue;
            char buf[4096];
            for (;;) {
                ssize_t r = recv(c->fd, buf, sizeof buf, 0);
                if (r > 0) {
                    int take = r < 12 - c->got ? (int)r : 12 - c->got;
                    if (take > 0) {
                        memcpy(c->head + c->got, buf, (size_t)take);
                        c->got += take;
                    }
                    continue;
                }
                if (r < 0 && (errno == EAGAIN || errno == EINTR)) break;
                /* EOF or error: the connection is over. */
                close(c->fd);
                c->state = DONE;
                inflight--;
                finished++;
                if (r == 0 && c->got == 12 && memcmp(c->head, "HTTP/1.1 200", 12) == 0) {
                    ok++;
                    latency[n_lat++] = now_ns() - (t0 + i * interval);
                } else {
                    errors++;
                }
                break;
            }
        }
    }
    double duration = (double)(now_ns() - t0) / 1e9;
    qsort(latency, (size_t)n_lat, sizeof *latency, cmp_i64);
    double sum = 0;
    for (long k = 0; k < n_lat; k++) sum += (double)latency[k];
    printf("{\"offered_rate\": %.1f, \"count\": %ld, \"ok\": %ld, \"errors\": %ld, "
           "\"timeouts\": %ld, \"not_started\": %ld, \"duration_s\": %.3f, "
           "\"mean_us\": %.1f, \"p50_us\": %.1f, \"p90_us\": %.1f, \"p99_us\": %.1f, "
           "\"p999_us\": %.1f, \"max_us\": %.1f}\n",
           rate, count, ok, errors, timeouts, not_started, duration,
           n_lat ? sum / (double)n_lat / 1000.0 : -1.0, percentile_us(latency, n_lat, 50),
           percentile_us(latency, n_lat, 90), percentile_us(latency, n_lat, 99),
           percentile_us(latency, n_lat, 99.9), n_lat ? (double)latency[n_lat - 1] / 1000.0 : -1.0);
    return 0;
}

/* ------------------------------------------------------------- udp echo */

static volatile sig_atomic_t stop_requested;

static void on_stop(int sig) {
    (void)sig;
    stop_requested = 1;
}

static int udp_echo_server(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: loadgen udp-echo-server HOST PORT MAX_SECONDS\n");
        return 2;
    }
    struct sockaddr_in sa = loopback_address(argv[2], argv[3]);
    int max_seconds = atoi(argv[4]);
    if (max_seconds <= 0) {
        fprintf(stderr, "loadgen: MAX_SECONDS must be > 0\n");
        return 2;
    }
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    if (fd < 0) die("socket");
    int size = 4 << 20;
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof size);
    if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0) die("bind");
    struct sigaction act = {.sa_handler = on_stop};
    sigaction(SIGTERM, &act, NULL);
    sigaction(SIGINT, &act, NULL);
    sigaction(SIGALRM, &act, NULL);
    alarm((unsigned)max_seconds);
    static char bufs[BATCH][2048];
    struct mmsghdr msgs[BATCH];
    struct iovec iovs[BATCH];
    struct sockaddr_in peers[BATCH];
    socklen_t bound_len = sizeof sa;
    getsockname(fd, (struct sockaddr *)&sa, &bound_len);
    printf("ready %d\n", ntohs(sa.sin_port));
    fflush(stdout);
    while (!stop_requested) {
        for (int k = 0; k < BATCH; k++) {
            iovs[k].iov_base = bufs[k];
            iovs[k].iov_len = sizeof bufs[k];
            memset(&msgs[k], 0, sizeof msgs[k]);
            msgs[k].msg_hdr.msg_iov = &iovs[k];
            msgs[k].msg_hdr.msg_iovlen = 1;
            msgs[k].msg_hdr.msg_name = &peers[k];
            msgs[k].msg_hdr.msg_namelen = sizeof peers[k];
        }
        /* Blocks for the first datagram, then takes what is queued. */
        int n = recvmmsg(fd, msgs, BATCH, MSG_WAITFORONE, NULL);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("recvmmsg");
        }
        for (int k = 0; k < n; k++) iovs[k].iov_len = msgs[k].msg_len;
        int sent = sendmmsg(fd, msgs, (unsigned)n, 0);
        (void)sent;
    }
    return 0;
}

struct flow {
    int fd;
    int64_t last_heard;
};

static int udp_flood(int argc, char **argv) {
    if (argc != 8) {
        fprintf(stderr, "usage: loadgen udp-flood HOST PORT FLOWS SIZE WINDOW SECONDS\n");
        return 2;
    }
    struct sockaddr_in sa = loopback_address(argv[2], argv[3]);
    int flows = atoi(argv[4]), size = atoi(argv[5]), window = atoi(argv[6]);
    double seconds = atof(argv[7]);
    if (flows < 1 || flows > 1024 || size < 1 || size > 1400 || window < 1 || window > 1024 ||
        seconds <= 0 || seconds > 600) {
        fprintf(stderr, "loadgen: need 1<=FLOWS<=1024, 1<=SIZE<=1400, 1<=WINDOW<=1024, 0<SECONDS<=600\n");
        return 2;
    }
    struct flow *fl = calloc((size_t)flows, sizeof *fl);
    if (!fl) die("calloc");
    int ep = epoll_create1(0);
    char payload[1400];
    memset(payload, 'x', sizeof payload);
    long sent = 0, received = 0;
    int64_t start = now_ns(), end = start + (int64_t)(seconds * 1e9);
    for (int f = 0; f < flows; f++) {
        fl[f].fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
        if (fl[f].fd < 0) die("socket");
        if (connect(fl[f].fd, (struct sockaddr *)&sa, sizeof sa) < 0) die("connect");
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)f};
        epoll_ctl(ep, EPOLL_CTL_ADD, fl[f].fd, &ev);
        fl[f].last_heard = start;
        for (int w = 0; w < window; w++)
            if (send(fl[f].fd, payload, (size_t)size, 0) == size) sent++;
    }
    struct epoll_event events[256];
    char buf[2048];
    for (;;) {
        int64_t now = now_ns();
        if (now >= end) break;
        int n = epoll_wait(ep, events, 256, 5);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        now = now_ns();
        for (int k = 0; k < n; k++) {
            struct flow *f = &fl[events[k].data.u32];
            for (int burst = 0; burst < 64; burst++) {
                ssize_t r = recv(f->fd, buf, sizeof buf, 0);
                if (r < 0) break;
                received++;
                f->last_heard = now;
                if (send(f->fd, payload, (size_t)size, 0) == size) sent++;
            }
        }
        for (int f = 0; f < flows; f++) {
            if (now - fl[f].last_heard > 20000000LL) {
                fl[f].last_heard = now;
                for (int w = 0; w < window; w++)
                    if (send(fl[f].fd, payload, (size_t)size, 0) == size) sent++;
            }
        }
    }
    double duration = (double)(now_ns() - start) / 1e9;
    printf("{\"flows\": %d, \"size\": %d, \"window\": %d, \"duration_s\": %.3f, "
           "\"sent\": %ld, \"received\": %ld}\n",
           flows, size, window, duration, sent, received);
    return 0;
}

int main(int argc, char **argv) {
    if (argc >= 2 && strcmp(argv[1], "paced-tcp") == 0) return paced_tcp(argc, argv);
    if (argc >= 2 && strcmp(argv[1], "udp-echo-server") == 0) return udp_echo_server(argc, argv);
    if (argc >= 2 && strcmp(argv[1], "udp-flood") == 0) return udp_flood(argc, argv);
    fprintf(stderr, "usage: loadgen paced-tcp|udp-echo-server|udp-flood ...\n");
    return 2;
}
