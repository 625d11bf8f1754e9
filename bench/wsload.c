/*
 * wsload.c: the benchmark's load client in C (bench/fanout.py --client c).
 *
 * Why it exists: on a 2-core machine the Python load clients (bench/wsload.py) need ~0.7 of a core
 * at 100,000 deliveries/s, CPU the server under test then lacks. This client does the same work
 * with a fraction of the CPU, so the benchmark measures the server rather than its own clients.
 * It behaves like wsload.py: a real client handshake (`Authorization: Bearer <own token>`, status
 * 101 checked; the Sec-WebSocket-Accept value is not verified), one masked `subscribe` frame per
 * connection, server frames parsed from the received bytes (length header, opcode, one memmem of
 * `"t":` and one strtod per event in a text frame), pings answered with masked pongs. Latency
 * samples are the receive time of the TCP chunk minus the publish time carried in the event, in ms.
 *
 * MODE (of `connect`) adapts only the URL and the subscribe handshake to the server under test:
 *   gateway     PATH as given (/v1/ws); frame {"op":"subscribe","id":1,"scope":"conversation:c<k>"};
 *               open at the reply carrying "subscribed"
 *   nchan       PATH + "c<k>" (the channel in the URL, e.g. /sub/c7); open at the 101 (Nchan subscribes
 *               the connection at the upgrade; no frame)
 *   centrifugo  PATH as given (/connection/websocket); Centrifugo's JSON protocol: {"id":1,"connect":
 *               {"token":...}}, at its reply {"id":2,"subscribe":{"channel":"c<k>"}}, open at the reply
 *               to id 2; the server's application-level pings (a `{}` line) are answered with `{}`.
 * A text frame may carry several events (Centrifugo joins queued pushes with newlines): each `"t":` in
 * it is one delivery.
 *
 * Usage: wsload INDEX NPROCS TOKENS_FILE   (tokens of this process's connections, one per line)
 * Driven over stdin/stdout by bench/cload.py (one command per line; replies below):
 *   connect HOST PORT PATH UPTO NSCOPES CONCURRENCY MODE [DEFLATE]   (MODE: gateway, nchan, centrifugo;
 *                            DEFLATE 1: these connections offer permessage-deflate, 0: they do not; default
 *                            WSLOAD_DEFLATE) -> connected OK SECONDS {"reason": count, ...}
 *   measure W0 W1            -> measuring
 *   report                   -> report WINDOW_EVENTS NSAMPLES TOTAL LOST BAD WIRE FRAMES ZFRAMES PAYLOAD {"code": count}
 *                               followed by NSAMPLES float32 (little-endian) on stdout. WIRE: bytes received
 *                               (recv) in the window, i.e. the server's WebSocket frames as sent, headers,
 *                               pings and all (TCP/IP headers not included); FRAMES: data frames parsed in the
 *                               window, ZFRAMES of them compressed (RSV1); PAYLOAD: their payload bytes after
 *                               inflating (what the application reads)
 *   negotiated               -> negotiated {"Sec-WebSocket-Extensions of the 101 (\"\" if none)": count, ...}
 *                               over the connections opened since the last `disconnect`
 *   count                    -> count TOTAL LOST {"code": count}
 *   disconnect               -> disconnected
 *   exit
 * With WSLOAD_DEFLATE=1 in its environment, or DEFLATE 1 in `connect` (bench/fanout.py --compress,
 * bench/deflatepeer.py; built with zlib, -DHAVE_ZLIB), the connections offer `permessage-deflate` (no
 * parameters: the server chooses) and inflate compressed (RSV1) server frames before parsing them, each
 * on its own: this client assumes no context takeover, and counts a frame it cannot inflate alone as bad.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#ifdef HAVE_ZLIB
#include <zlib.h>
#endif

enum { CONNECTING, HANDSHAKE, AUTHENTICATING, SUBSCRIBING, OPEN, DEAD };

typedef struct {
    int fd, state, local, deflate;
    double deadline;
    unsigned char *buf;
    size_t len, cap;
} conn_t;

enum { MODE_GATEWAY, MODE_NCHAN, MODE_CENTRIFUGO };
static char host[64], path[256], mode_name[32];
static int mode;
static int port, nscopes, index_, nprocs;
static char **tokens;
static int ntokens;
static struct sockaddr_in addr;
static int ep;

static conn_t **conns;
static int nconns, next_local;

/* the running `connect` command */
static int connecting, upto, concurrency, inflight, ok_count;
static double connect_t0;
#define MAX_REASONS 16
static char reasons[MAX_REASONS][96];
static long reason_counts[MAX_REASONS];
static int nreasons;

/* measurement */
static double W0 = 1e300, W1 = -1e300;
static float *samples;
static size_t nsamples, samples_cap;
static long total_events, window_events, bad_frames, lost;
static long window_wire, window_frames, window_zframes, window_payload; /* see `report` */
static int deflate_default; /* WSLOAD_DEFLATE=1: connections offer permessage-deflate unless `connect` says */
static int deflate_on; /* the running `connect` command's */
/* the Sec-WebSocket-Extensions answers seen since the last `disconnect` (`negotiated`) */
#define MAX_EXTS 8
static char exts[MAX_EXTS][160];
static long ext_counts[MAX_EXTS];
static int nexts;
#ifdef HAVE_ZLIB
static z_stream zs;
static unsigned char *inflated;
static size_t inflated_cap = 1 << 20;

/* One compressed message (no context takeover: each inflates on its own); NULL if it does not. */
static const unsigned char *inflate_frame(const unsigned char *p, size_t n, size_t *out) {
    static const unsigned char tail[4] = {0, 0, 0xff, 0xff};
    inflateReset(&zs);
    zs.next_out = inflated;
    zs.avail_out = (uInt)inflated_cap;
    zs.next_in = (unsigned char *)p;
    zs.avail_in = (uInt)n;
    if (inflate(&zs, Z_SYNC_FLUSH) < Z_OK && zs.avail_in) return NULL;
    zs.next_in = (unsigned char *)tail;
    zs.avail_in = 4;
    int r = inflate(&zs, Z_SYNC_FLUSH);
    if (r != Z_OK && r != Z_STREAM_END && r != Z_BUF_ERROR) return NULL;
    *out = inflated_cap - zs.avail_out;
    return inflated;
}
#endif
#define MAX_CODES 16
static int close_codes[MAX_CODES];
static long close_counts[MAX_CODES];
static int ncodes;

static double now_wall(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void out(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void out(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    fflush(stdout);
}

static void add_reason(const char *why) {
    for (int i = 0; i < nreasons; i++)
        if (strcmp(reasons[i], why) == 0) { reason_counts[i]++; return; }
    if (nreasons < MAX_REASONS) {
        snprintf(reasons[nreasons], sizeof reasons[0], "%s", why);
        for (char *p = reasons[nreasons]; *p; p++)
            if (*p == '"' || *p == '\\' || (unsigned char)*p < 32) *p = ' ';
        reason_counts[nreasons++] = 1;
    }
}

static void add_ext(const unsigned char *head, size_t n) {
    /* the value of the response's Sec-WebSocket-Extensions header ("" when absent), counted */
    static const char name[] = "\r\nsec-websocket-extensions:";
    char value[160] = "";
    size_t nl = sizeof name - 1;
    for (size_t i = 0; i + nl <= n; i++) {
        if (strncasecmp((const char *)head + i, name, nl) != 0) continue;
        size_t j = i + nl, k = 0;
        while (j < n && head[j] == ' ') j++;
        while (j < n && head[j] != '\r' && k < sizeof value - 1) {
            unsigned char ch = head[j++];
            value[k++] = (ch == '"' || ch == '\\' || ch < 32) ? ' ' : (char)ch;
        }
        value[k] = 0;
        break;
    }
    for (int i = 0; i < nexts; i++)
        if (strcmp(exts[i], value) == 0) { ext_counts[i]++; return; }
    if (nexts < MAX_EXTS) { snprintf(exts[nexts], sizeof exts[0], "%s", value); ext_counts[nexts++] = 1; }
}

static void add_close(int code) {
    for (int i = 0; i < ncodes; i++)
        if (close_codes[i] == code) { close_counts[i]++; return; }
    if (ncodes < MAX_CODES) { close_codes[ncodes] = code; close_counts[ncodes++] = 1; }
}

static void print_closes(void) {
    printf("{");
    for (int i = 0; i < ncodes; i++) printf("%s\"%d\": %ld", i ? ", " : "", close_codes[i], close_counts[i]);
    printf("}");
}

static void send_all(int fd, const void *data, size_t n) {
    const char *p = data;
    while (n) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR) continue;
            return; /* EAGAIN on a tiny control frame or a dead socket: the benchmark notices either */
        }
        p += w;
        n -= (size_t)w;
    }
}

/* One complete masked client frame (FIN set). */
static void send_frame(int fd, int opcode, const unsigned char *payload, size_t n) {
    unsigned char head[14 + 125 + 4096];
    size_t h = 0;
    if (n > 4096) return;
    head[h++] = 0x80 | opcode;
    if (n < 126) head[h++] = 0x80 | n;
    else { head[h++] = 0x80 | 126; head[h++] = n >> 8; head[h++] = n & 0xff; }
    uint32_t r = (uint32_t)random();
    unsigned char key[4] = {r, r >> 8, r >> 16, r >> 24};
    memcpy(head + h, key, 4);
    h += 4;
    for (size_t i = 0; i < n; i++) head[h + i] = payload[i] ^ key[i & 3];
    send_all(fd, head, h + n);
}

static void finish_attempt(conn_t *c, const char *why) {
    /* a connection of the running `connect` command has subscribed (why == NULL) or failed */
    if (why) add_reason(why);
    else ok_count++;
    inflight--;
    (void)c;
}

static void kill_conn(conn_t *c, const char *why) {
    if (c->state == DEAD) return;
    if (c->state == OPEN) lost++;
    else if (connecting) finish_attempt(c, why ? why : "connection lost before subscribed");
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->state = DEAD;
    free(c->buf);
    c->buf = NULL;
    c->len = c->cap = 0;
}

static void start_one(int local) {
    conn_t *c = calloc(1, sizeof *c);
    c->local = local;
    c->deflate = deflate_on;
    c->deadline = now_wall() + 45.0;
    conns[nconns++] = c;
    inflight++;
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->state = CONNECTING;
    if (connect(c->fd, (struct sockaddr *)&addr, sizeof addr) < 0 && errno != EINPROGRESS) {
        char why[96];
        snprintf(why, sizeof why, "connect: %s", strerror(errno));
        close(c->fd);
        c->state = DEAD;
        finish_attempt(c, why);
        return;
    }
    struct epoll_event ev = {.events = EPOLLOUT | EPOLLIN, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
}

/* The scope (channel) of a connection: global index mod NSCOPES, as the tokens are dealt. */
static int scope_of(const conn_t *c) { return (c->local * nprocs + index_) % nscopes; }

static void send_request(conn_t *c) {
    static const char b64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    unsigned char raw[18] = {0};
    for (int i = 0; i < 16; i++) raw[i] = random() & 0xff;
    char key[25];
    int k = 0;
    for (int i = 0; i < 18; i += 3) {
        uint32_t v = raw[i] << 16 | raw[i + 1] << 8 | raw[i + 2];
        key[k++] = b64[v >> 18 & 63]; key[k++] = b64[v >> 12 & 63];
        key[k++] = b64[v >> 6 & 63]; key[k++] = b64[v & 63];
    }
    key[22] = key[23] = '=';
    key[24] = 0;
    char req[8192], url[300];
    if (mode == MODE_NCHAN) snprintf(url, sizeof url, "%sc%d", path, scope_of(c));
    else snprintf(url, sizeof url, "%s", path);
    int n = snprintf(req, sizeof req,
                     "GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\nAuthorization: Bearer %s\r\n%s\r\n",
                     url, host, port, key, tokens[c->local],
                     c->deflate ? "Sec-WebSocket-Extensions: permessage-deflate\r\n" : "");
    send_all(c->fd, req, (size_t)n);
    c->state = HANDSHAKE;
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
}

static void subscribed(conn_t *c) {
    c->state = OPEN;
    if (connecting) finish_attempt(c, NULL);
}

static void on_centrifugo_text(conn_t *c, const unsigned char *p, size_t n) {
    /* a line `{}` is the server's ping (alone in the frame or joined to others by newlines) */
    if ((n == 2 && p[0] == '{' && p[1] == '}') || (n > 2 && memcmp(p, "{}\n", 3) == 0) || memmem(p, n, "\n{}", 3))
        send_frame(c->fd, 1, (const unsigned char *)"{}", 2);
    if (c->state == OPEN) return;
    if (memmem(p, n, "\"error\"", 7)) {
        kill_conn(c, "error reply from the server");
    } else if (c->state == AUTHENTICATING && memmem(p, n, "\"connect\"", 9)) {
        char sub[128];
        int sn = snprintf(sub, sizeof sub, "{\"id\":2,\"subscribe\":{\"channel\":\"c%d\"}}", scope_of(c));
        c->state = SUBSCRIBING;
        send_frame(c->fd, 1, (unsigned char *)sub, (size_t)sn);
    } else if (c->state == SUBSCRIBING && memmem(p, n, "\"id\":2", 6)) {
        subscribed(c);
    }
}

static void on_control_text(conn_t *c, const unsigned char *p, size_t n) {
    if (mode == MODE_CENTRIFUGO) {
        on_centrifugo_text(c, p, n);
        return;
    }
    if (memmem(p, n, "\"subscribed\"", 12)) {
        if (c->state == SUBSCRIBING) subscribed(c);
    } else if (memmem(p, n, "\"error\"", 7)) {
        kill_conn(c, "error frame from the server");
    }
}

/* Parse complete frames of data[0:n]; returns the number of bytes consumed. */
static size_t parse(conn_t *c, const unsigned char *data, size_t n, double now) {
    size_t pos = 0;
    int rec = W0 <= now && now < W1;
    long events = 0;
    while (n - pos >= 2) {
        size_t ln = data[pos + 1] & 0x7f, start;
        if (ln < 126) start = pos + 2;
        else if (ln == 126) {
            if (n - pos < 4) break;
            ln = (size_t)data[pos + 2] << 8 | data[pos + 3];
            start = pos + 4;
        } else {
            if (n - pos < 10) break;
            ln = 0;
            for (int i = 2; i < 10; i++) ln = ln << 8 | data[pos + i];
            start = pos + 10;
        }
        size_t end = start + ln;
        if (end > n) break;
        int op = data[pos] & 0x0f, rsv1 = data[pos] & 0x40;
        pos = end;
        const unsigned char *body = data + start;
#ifdef HAVE_ZLIB
        if (rsv1 && op == 1 && c->deflate) {
            body = inflate_frame(data + start, ln, &ln);
            if (!body) { bad_frames++; continue; }
        } else if (rsv1) { bad_frames++; continue; }
#else
        if (rsv1) { bad_frames++; continue; }
#endif
        if (rec && (op == 1 || op == 2)) {
            window_frames++;
            window_zframes += rsv1 != 0;
            window_payload += (long)ln;
        }
        if (op == 1) {
            const unsigned char *p = body, *fend = body + ln;
            const unsigned char *t = memmem(p, ln, "\"t\":", 4);
            if (!t || mode == MODE_CENTRIFUGO) {
                on_control_text(c, p, ln); /* Centrifugo: a ping may share the frame with events */
                if (c->state == DEAD) return n;
            }
            for (; t; t = memmem(p, (size_t)(fend - p), "\"t\":", 4)) {
                events++;
                p = t + 4;
                if (rec) {
                    double sent = strtod((const char *)p, NULL);
                    if (nsamples == samples_cap) {
                        samples_cap = samples_cap ? samples_cap * 2 : 1 << 20;
                        samples = realloc(samples, samples_cap * sizeof *samples);
                    }
                    samples[nsamples++] = (float)((now - sent) * 1000.0);
                }
            }
        } else if (op == 9) {
            send_frame(c->fd, 0xA, data + start, ln);
        } else if (op == 8) {
            add_close(ln >= 2 ? data[start] << 8 | data[start + 1] : 1005);
            kill_conn(c, "closed by the server");
            return n;
        } else if (op != 0xA) {
            bad_frames++;
        }
    }
    total_events += events;
    if (rec) window_events += events;
    return pos;
}

static void on_readable(conn_t *c) {
    static unsigned char chunk[1 << 18];
    for (;;) {
        ssize_t r = recv(c->fd, chunk, sizeof chunk, 0);
        if (r < 0) {
            if (errno == EINTR) continue;
            if (errno != EAGAIN) kill_conn(c, "recv error");
            return;
        }
        if (r == 0) { kill_conn(c, "connection lost before subscribed"); return; }
        double now = now_wall();
        if (W0 <= now && now < W1) window_wire += r;
        const unsigned char *data = chunk;
        size_t n = (size_t)r;
        if (c->len) { /* a partial frame is waiting: append and parse from the connection's buffer */
            if (c->len + n > c->cap) {
                c->cap = (c->len + n) * 2;
                c->buf = realloc(c->buf, c->cap);
            }
            memcpy(c->buf + c->len, chunk, n);
            c->len += n;
            data = c->buf;
            n = c->len;
        }
        size_t used = 0;
        if (c->state == HANDSHAKE) {
            const unsigned char *e = memmem(data, n, "\r\n\r\n", 4);
            if (!e) {
                if (n > 16384) { kill_conn(c, "oversized handshake response"); return; }
                used = 0;
            } else {
                if (n < 12 || memcmp(data, "HTTP/1.1 101", 12) != 0) {
                    kill_conn(c, "handshake refused");
                    return;
                }
                used = (size_t)(e - data) + 4;
                add_ext(data, used);
                if (mode == MODE_NCHAN) {
                    subscribed(c); /* the channel is in the URL: subscribed at the upgrade */
                } else if (mode == MODE_CENTRIFUGO) {
                    char cmd[8192];
                    int cn = snprintf(cmd, sizeof cmd, "{\"id\":1,\"connect\":{\"token\":\"%s\"}}", tokens[c->local]);
                    c->state = AUTHENTICATING;
                    send_frame(c->fd, 1, (unsigned char *)cmd, (size_t)cn);
                } else {
                    c->state = SUBSCRIBING;
                    char sub[128];
                    int sn = snprintf(sub, sizeof sub, "{\"op\":\"subscribe\",\"id\":1,\"scope\":\"conversation:c%d\"}",
                                      scope_of(c));
                    send_frame(c->fd, 1, (unsigned char *)sub, (size_t)sn);
                }
                used += parse(c, data + used, n - used, now);
            }
        } else {
            used = parse(c, data, n, now);
        }
        if (c->state == DEAD) return;
        size_t rest = n - used;
        if (rest) {
            if (data != c->buf) {
                if (rest > c->cap) { c->cap = rest * 2 > 65536 ? rest * 2 : 65536; c->buf = realloc(c->buf, c->cap); }
                memcpy(c->buf, data + used, rest);
            } else if (used) {
                memmove(c->buf, c->buf + used, rest);
            }
        }
        c->len = rest;
        if ((size_t)r < sizeof chunk) return;
    }
}

static void maybe_finish_connect(void) {
    if (!connecting) return;
    while (inflight < concurrency && next_local < upto) start_one(next_local++);
    if (inflight > 0 || next_local < upto) return;
    connecting = 0;
    printf("connected %d %.3f {", ok_count, now_wall() - connect_t0);
    for (int i = 0; i < nreasons; i++) printf("%s\"%s\": %ld", i ? ", " : "", reasons[i], reason_counts[i]);
    printf("}\n");
    fflush(stdout);
}

static void check_deadlines(void) {
    double now = now_wall();
    for (int i = 0; i < nconns; i++) {
        conn_t *c = conns[i];
        if (c->state != DEAD && c->state != OPEN && now > c->deadline) kill_conn(c, "timeout");
    }
}

static void disconnect_all(void) {
    unsigned char code[2] = {1000 >> 8, 1000 & 0xff};
    for (int i = 0; i < nconns; i++) {
        conn_t *c = conns[i];
        if (c->state != DEAD) { /* a deliberate close: not counted as lost */
            if (c->state == OPEN) send_frame(c->fd, 8, code, 2);
            epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
            close(c->fd);
            c->state = DEAD;
        }
        free(c->buf);
        free(c);
    }
    nconns = 0;
    next_local = 0;
    connecting = 0;
    usleep(500000);
    lost = 0;
    ncodes = 0;
    nexts = 0;
    out("disconnected\n");
}

static int command(char *line) {
    char cmd[32];
    if (sscanf(line, "%31s", cmd) != 1) return 0;
    if (!strcmp(cmd, "connect")) {
        int dfl = deflate_default;
        int got = sscanf(line, "%*s %63s %d %255s %d %d %d %31s %d", host, &port, path, &upto, &nscopes,
                         &concurrency, mode_name, &dfl);
        if (got < 7 || (dfl != 0 && dfl != 1)
            || inet_pton(AF_INET, host, &addr.sin_addr) != 1 || nscopes < 1 || concurrency < 1
            || (strcmp(mode_name, "gateway") && strcmp(mode_name, "nchan") && strcmp(mode_name, "centrifugo"))) {
            out("connected 0 0 {\"bad connect command\": 1}\n");
            return 0;
        }
#ifndef HAVE_ZLIB
        if (dfl) { out("connected 0 0 {\"DEFLATE 1 needs a build with zlib\": 1}\n"); return 0; }
#endif
        deflate_on = dfl;
        mode = !strcmp(mode_name, "nchan") ? MODE_NCHAN : !strcmp(mode_name, "centrifugo") ? MODE_CENTRIFUGO
                                                                                             : MODE_GATEWAY;
        addr.sin_family = AF_INET;
        addr.sin_port = htons((uint16_t)port);
        if (upto > ntokens) upto = ntokens;
        connecting = 1;
        inflight = ok_count = nreasons = 0;
        connect_t0 = now_wall();
        maybe_finish_connect();
    } else if (!strcmp(cmd, "measure")) {
        sscanf(line, "%*s %lf %lf", &W0, &W1);
        nsamples = 0;
        window_events = window_wire = window_frames = window_zframes = window_payload = 0;
        out("measuring\n");
    } else if (!strcmp(cmd, "report")) {
        W0 = 1e300; W1 = -1e300;
        printf("report %ld %zu %ld %ld %ld %ld %ld %ld %ld ", window_events, nsamples, total_events, lost, bad_frames,
               window_wire, window_frames, window_zframes, window_payload);
        print_closes();
        printf("\n");
        fwrite(samples, sizeof *samples, nsamples, stdout);
        fflush(stdout);
        nsamples = 0;
    } else if (!strcmp(cmd, "count")) {
        printf("count %ld %ld ", total_events, lost);
        print_closes();
        printf("\n");
        fflush(stdout);
    } else if (!strcmp(cmd, "negotiated")) {
        printf("negotiated {");
        for (int i = 0; i < nexts; i++) printf("%s\"%s\": %ld", i ? ", " : "", exts[i], ext_counts[i]);
        printf("}\n");
        fflush(stdout);
    } else if (!strcmp(cmd, "disconnect")) {
        disconnect_all();
    } else if (!strcmp(cmd, "exit")) {
        return 1;
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s INDEX NPROCS TOKENS_FILE\n", argv[0]);
        return 2;
    }
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    signal(SIGPIPE, SIG_IGN);
    index_ = atoi(argv[1]);
    nprocs = atoi(argv[2]);
    srandom((unsigned)(getpid() ^ (unsigned)now_wall()));
    const char *dfl = getenv("WSLOAD_DEFLATE");
    deflate_default = deflate_on = dfl && strcmp(dfl, "1") == 0;
#ifdef HAVE_ZLIB
    inflated = malloc(inflated_cap);
    if (inflateInit2(&zs, -15) != Z_OK) { fprintf(stderr, "inflateInit2 failed\n"); return 2; }
#else
    if (deflate_on) { fprintf(stderr, "WSLOAD_DEFLATE=1 needs a build with zlib (-DHAVE_ZLIB -lz)\n"); return 2; }
#endif
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) { rl.rlim_cur = rl.rlim_max; setrlimit(RLIMIT_NOFILE, &rl); }

    FILE *tf = fopen(argv[3], "r");
    if (!tf) { perror("tokens"); return 2; }
    size_t cap = 1024;
    tokens = malloc(cap * sizeof *tokens);
    char *line = NULL;
    size_t lcap = 0;
    ssize_t ll;
    while ((ll = getline(&line, &lcap, tf)) > 0) {
        while (ll && (line[ll - 1] == '\n' || line[ll - 1] == '\r')) line[--ll] = 0;
        if (!ll) continue;
        if ((size_t)ntokens == cap) tokens = realloc(tokens, (cap *= 2) * sizeof *tokens);
        tokens[ntokens++] = strdup(line);
    }
    fclose(tf);
    conns = calloc((size_t)ntokens + 1, sizeof *conns);

    ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event sev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, 0, &sev);
    out("ready %d\n", getpid());

    char cbuf[4096];
    size_t clen = 0;
    struct epoll_event evs[512];
    double last_check = now_wall();
    for (;;) {
        int n = epoll_wait(ep, evs, 512, 100);
        int commands = 0;
        for (int i = 0; i < n; i++) {
            conn_t *c = evs[i].data.ptr;
            if (!c) {
                commands = 1; /* after the sockets: `disconnect` frees connections this batch may name */
                continue;
            }
            if (c->state == DEAD) continue;
            if (c->state == CONNECTING) {
                int err = 0;
                socklen_t el = sizeof err;
                getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &el);
                if (err) {
                    char why[96];
                    snprintf(why, sizeof why, "connect: %s", strerror(err));
                    kill_conn(c, why);
                    continue;
                }
                send_request(c);
                continue;
            }
            if (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) on_readable(c);
        }
        if (commands) {
            ssize_t r = read(0, cbuf + clen, sizeof cbuf - 1 - clen);
            if (r <= 0) return 0; /* the parent is gone */
            clen += (size_t)r;
            char *nl;
            while ((nl = memchr(cbuf, '\n', clen))) {
                *nl = 0;
                if (command(cbuf)) return 0;
                size_t used = (size_t)(nl - cbuf) + 1;
                memmove(cbuf, cbuf + used, clen - used);
                clen -= used;
            }
        }
        if (connecting) {
            double now = now_wall();
            if (now - last_check > 0.5) { check_deadlines(); last_check = now; }
            maybe_finish_connect();
        }
    }
}
