/*
 * cload: one worker of bench/loadgen.py's load generator, in C (engine "c").
 *
 * It does what one Python worker (_Worker with its _Connections) does, on one
 * thread: epoll over non-blocking TCP connections (TCP_NODELAY), a timerfd
 * pacing the open loop, another for the run's phases. bench/loadgen.py
 * compiles it (gcc -O2) on first use, builds the request templates, starts one
 * process per worker and turns its output files into the dict
 * _Worker.report() returns.
 *
 *   cload key=value ...          (see struct cfg and parse_args for the keys)
 *
 * Handshake on stdin/stdout: after connecting every connection it prints
 * "ready"; it then reads "start <t_start_ns>" (CLOCK_MONOTONIC). On any failure
 * it exits non-zero with one line on stderr.
 *
 * Output, into the directory out=DIR:
 *   latencies.i64 good.i64 default.i64 lags.i64 lost_sent.i64
 *       raw little-endian int64 arrays (ns)
 *   errors.bin    per error key: u32 key length, key bytes, i64 count,
 *                 u8 has latencies, and if so u64 n, n x i64 (from the
 *                 timetable), u64 m, m x i64 (from the actual send)
 *   scalars.txt   key=value lines (counters, CPU seconds, window length)
 *
 * Replies are matched like the Python worker does after msgpack.unpackb(body)
 * (raw=False, strict_map_key=True): a body must be exactly one valid msgpack
 * object (UTF-8 strings, str/bin map keys, at most 1024 nested containers,
 * valid timestamps) or it is a "malformed_reply".
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/timerfd.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#define MAX_REPLY_BYTES (64ull * 1024 * 1024) /* a larger reply is skipped: "reply_too_large" */
#define MAX_LOST_TIMES 100000                 /* lost_sent_ns kept per worker */
#define MAX_DEPTH 1024                        /* msgpack-python's nesting bound */
#define READ_CHUNK (256 * 1024)
#define WIRE_RESULT 65 /* clipper/protocol/wire.py; bench/loadgen.py passes the real values */
#define WIRE_ERROR 127

/* ------------------------------------------------------------------ config */
static struct cfg {
    const char *host;
    int port;
    int closed_loop;
    int poisson;
    int index, workers, nconns, concurrency;
    double rate, total_rate;
    int64_t seed;
    int64_t warmup_ns, duration_ns, drain_ns, connect_timeout_ns, hard_timeout_ns;
    int64_t quantum_ns, max_outstanding;
    const char *templates_path, *out_dir;
    int template_start;
    size_t id_offset, data_offset;
    int stamp_size; /* 0: no stamp, 4: float32, 8: float64 */
    int64_t salt;
    int64_t stop_codes[64];
    int nstop;
    int64_t wire_result, wire_error;
} C = {.wire_result = WIRE_RESULT, .wire_error = WIRE_ERROR};

static void die(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));
static void die(const char *fmt, ...) {
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    for (char *p = msg; *p; p++)
        if (*p == '\n') *p = ' ';
    fprintf(stderr, "worker %d %s\n", C.index, msg);
    fflush(stderr);
    _exit(2);
}

static void *xrealloc(void *p, size_t n) {
    void *q = realloc(p, n ? n : 1);
    if (!q) die("failed: out of memory (%zu bytes)", n);
    return q;
}

static inline int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* --------------------------------------------------------- growable arrays */
typedef struct {
    int64_t *a;
    size_t n, cap;
} vec;

static void vgrow(vec *v) {
    v->cap = v->cap ? v->cap * 2 : 4096;
    v->a = xrealloc(v->a, v->cap * sizeof(int64_t));
}
static inline void vpush(vec *v, int64_t x) {
    if (v->n == v->cap) vgrow(v);
    v->a[v->n++] = x;
}

typedef struct {
    char *s;
    size_t n, cap;
} sbuf;

static void sput(sbuf *b, const void *p, size_t n) {
    if (b->n + n + 1 > b->cap) {
        while (b->n + n + 1 > b->cap) b->cap = b->cap ? b->cap * 2 : 256;
        b->s = xrealloc(b->s, b->cap);
    }
    memcpy(b->s + b->n, p, n);
    b->n += n;
    b->s[b->n] = 0;
}
static void sputs(sbuf *b, const char *s) { sput(b, s, strlen(s)); }
static void sprintf_(sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void sprintf_(sbuf *b, const char *fmt, ...) {
    char tmp[128];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    sput(b, tmp, (size_t)n < sizeof tmp ? (size_t)n : sizeof tmp - 1);
}

/* ---------------------------------------------------------------- state */
typedef struct {
    int64_t sched; /* scheduled (open loop) or actual (closed loop) send time */
    int64_t sent;  /* actual send time; 0: the slot is free */
} slot;

typedef struct {
    int fd;
    int closed, stopped;
    /* in flight: ids lo..next_id-1 (mod 2^32) live in ring[id & mask] */
    uint32_t next_id, lo, mask, inflight;
    slot *ring;
    uint8_t *out; /* bytes not yet taken by the kernel */
    size_t out_off, out_len, out_cap;
    int want_out; /* EPOLLOUT armed */
    int touched;  /* open loop: got requests in this wake-up */
    uint8_t *in;
    size_t in_off, in_len, in_cap;
    uint64_t skip; /* bytes of an oversized reply still to skip */
} conn;

typedef struct {
    char *key;
    size_t klen;
    uint64_t hash;
    int64_t count;
    int has_lat;
    vec lat, sent_lat;
} errent;

static struct {
    conn *conns;
    uint8_t **tmpl;
    size_t *tmpl_len;
    int ntmpl, tmpl_k;
    uint64_t stamp_seq;
    int ep, send_tfd, ctl_tfd;
    int64_t t_start, ws, we, deadline, hard_deadline;
    int phase; /* 0 before t_start, 1 warmup, 2 window, 3 drain, 4 done */
    int sending, done, started;
    int64_t outstanding;
    /* open loop timetable */
    double sched_base, period, pois_acc;
    uint64_t sched_k, rng;
    int64_t next_t;
    int next_conn;
    /* records */
    vec lat, good, dflt, lags, lost_sent;
    int64_t errors_in_window, defaults, sent_in_window, scheduled_in_window, results_in_window;
    int64_t skipped, stopped_connections;
    struct rusage ru0, ru1;
    int64_t w0, w1;
    int begun, ended;
    /* error keys: open addressing */
    errent **etab;
    size_t ecap, ecount;
    errent **eorder;
} W;

/* ------------------------------------------------------------ error keys */
static uint64_t fnv(const char *s, size_t n) {
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) h = (h ^ (uint8_t)s[i]) * 1099511628211ull;
    return h;
}

static errent *err_get(const char *key, size_t n) {
    if (W.ecount * 2 >= W.ecap) {
        size_t ncap = W.ecap ? W.ecap * 2 : 64;
        errent **nt = calloc(ncap, sizeof *nt);
        if (!nt) die("failed: out of memory");
        for (size_t i = 0; i < W.ecap; i++)
            if (W.etab[i]) {
                size_t j = W.etab[i]->hash & (ncap - 1);
                while (nt[j]) j = (j + 1) & (ncap - 1);
                nt[j] = W.etab[i];
            }
        free(W.etab);
        W.etab = nt;
        W.ecap = ncap;
        W.eorder = xrealloc(W.eorder, ncap * sizeof *W.eorder);
    }
    uint64_t h = fnv(key, n);
    size_t j = h & (W.ecap - 1);
    while (W.etab[j]) {
        errent *e = W.etab[j];
        if (e->hash == h && e->klen == n && memcmp(e->key, key, n) == 0) return e;
        j = (j + 1) & (W.ecap - 1);
    }
    errent *e = calloc(1, sizeof *e);
    if (!e) die("failed: out of memory");
    e->key = xrealloc(NULL, n + 1);
    memcpy(e->key, key, n);
    e->key[n] = 0;
    e->klen = n;
    e->hash = h;
    W.etab[j] = e;
    W.eorder[W.ecount++] = e;
    return e;
}

/* _Worker.count_error: one more of ``key``; in the window if now is. */
static void count_error(const char *key, size_t n) {
    err_get(key, n)->count++;
    int64_t t = now_ns();
    if (W.ws <= t && t < W.we) W.errors_in_window++;
}
static void count_error_s(const char *key) { count_error(key, strlen(key)); }

/* ----------------------------------------------------------- in flight */
static void ring_init(conn *c, uint32_t size) {
    c->ring = calloc(size, sizeof(slot));
    if (!c->ring) die("failed: out of memory");
    c->mask = size - 1;
}

static void ring_grow(conn *c) {
    uint32_t size = c->mask + 1;
    if (size >= (1u << 31)) die("failed: over 2^31 requests in flight on one connection");
    uint32_t nsize = size * 2, nmask = nsize - 1;
    slot *nr = calloc(nsize, sizeof(slot));
    if (!nr) die("failed: out of memory");
    for (uint32_t id = c->lo; id != c->next_id; id++) nr[id & nmask] = c->ring[id & c->mask];
    free(c->ring);
    c->ring = nr;
    c->mask = nmask;
}

static inline uint32_t ring_put(conn *c, int64_t sched, int64_t sent) {
    if (c->next_id - c->lo > c->mask) ring_grow(c);
    uint32_t id = c->next_id++;
    slot *s = &c->ring[id & c->mask];
    s->sched = sched;
    s->sent = sent;
    c->inflight++;
    return id;
}

static inline int ring_take(conn *c, uint32_t id, slot *out) {
    if ((uint32_t)(id - c->lo) >= (uint32_t)(c->next_id - c->lo)) return 0;
    slot *s = &c->ring[id & c->mask];
    if (s->sent == 0) return 0;
    *out = *s;
    s->sent = 0;
    c->inflight--;
    while (c->lo != c->next_id && c->ring[c->lo & c->mask].sent == 0) c->lo++;
    return 1;
}

/* --------------------------------------------------------------- msgpack */
enum { T_NIL, T_BOOL, T_INT, T_UINT, T_FLOAT, T_STR, T_BIN, T_ARR, T_MAP, T_EXT, T_TS };

typedef struct {
    int t;
    int64_t i;  /* T_INT (negative), T_BOOL (0/1), T_EXT type */
    uint64_t u; /* T_UINT */
    double f;
    const uint8_t *p; /* T_STR, T_BIN, T_EXT payload */
    uint64_t n;       /* byte length (str, bin, ext) or element count (array, map) */
} mpobj;

static inline uint16_t be16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static inline uint32_t be32(const uint8_t *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
static inline uint64_t be64(const uint8_t *p) { return (uint64_t)be32(p) << 32 | be32(p + 4); }

/* Strict UTF-8 (what Python's decoder accepts): no overlongs, surrogates or > U+10FFFF. */
static int utf8_ok(const uint8_t *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        uint8_t c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        size_t k;
        uint32_t cp;
        if (c >= 0xC2 && c <= 0xDF) k = 1, cp = c & 0x1F;
        else if (c >= 0xE0 && c <= 0xEF) k = 2, cp = c & 0x0F;
        else if (c >= 0xF0 && c <= 0xF4) k = 3, cp = c & 0x07;
        else return 0;
        if (i + k >= n) return 0; /* truncated sequence */
        for (size_t j = 1; j <= k; j++) {
            if ((s[i + j] & 0xC0) != 0x80) return 0;
            cp = cp << 6 | (s[i + j] & 0x3F);
        }
        if ((k == 2 && cp < 0x800) || (k == 3 && (cp < 0x10000 || cp > 0x10FFFF)) ||
            (cp >= 0xD800 && cp <= 0xDFFF))
            return 0;
        i += k + 1;
    }
    return 1;
}

static size_t utf8_chars(const uint8_t *s, size_t n) {
    size_t k = 0;
    for (size_t i = 0; i < n; i++) k += (s[i] & 0xC0) != 0x80;
    return k;
}

/* Read one object's header at *pos (a str/bin/ext with its payload). 0 ok, -1 invalid or truncated. */
static int mp_head(const uint8_t *b, size_t len, size_t *pos, mpobj *o) {
    size_t p = *pos;
    if (p >= len) return -1;
    uint8_t c = b[p++];
    size_t avail = len - p;
    uint64_t n = 0;
    o->t = -1;
#define NEED(k)                          \
    do {                                 \
        if (avail < (size_t)(k)) return -1; \
    } while (0)
    if (c <= 0x7f) {
        o->t = T_UINT, o->u = c;
    } else if (c >= 0xe0) {
        o->t = T_INT, o->i = (int8_t)c;
    } else if (c <= 0x8f) {
        o->t = T_MAP, o->n = c & 0x0f;
    } else if (c <= 0x9f) {
        o->t = T_ARR, o->n = c & 0x0f;
    } else if (c <= 0xbf) {
        o->t = T_STR, n = c & 0x1f;
    } else {
        switch (c) {
        case 0xc0: o->t = T_NIL; break;
        case 0xc2: o->t = T_BOOL, o->i = 0; break;
        case 0xc3: o->t = T_BOOL, o->i = 1; break;
        case 0xc4: NEED(1); o->t = T_BIN, n = b[p], p += 1; break;
        case 0xc5: NEED(2); o->t = T_BIN, n = be16(b + p), p += 2; break;
        case 0xc6: NEED(4); o->t = T_BIN, n = be32(b + p), p += 4; break;
        case 0xc7: NEED(2); o->t = T_EXT, n = b[p], o->i = (int8_t)b[p + 1], p += 2; break;
        case 0xc8: NEED(3); o->t = T_EXT, n = be16(b + p), o->i = (int8_t)b[p + 2], p += 3; break;
        case 0xc9: NEED(5); o->t = T_EXT, n = be32(b + p), o->i = (int8_t)b[p + 4], p += 5; break;
        case 0xca: {
            NEED(4);
            uint32_t v = be32(b + p);
            float f;
            memcpy(&f, &v, 4);
            o->t = T_FLOAT, o->f = f, p += 4;
            break;
        }
        case 0xcb: {
            NEED(8);
            uint64_t v = be64(b + p);
            memcpy(&o->f, &v, 8);
            o->t = T_FLOAT, p += 8;
            break;
        }
        case 0xcc: NEED(1); o->t = T_UINT, o->u = b[p], p += 1; break;
        case 0xcd: NEED(2); o->t = T_UINT, o->u = be16(b + p), p += 2; break;
        case 0xce: NEED(4); o->t = T_UINT, o->u = be32(b + p), p += 4; break;
        case 0xcf: NEED(8); o->t = T_UINT, o->u = be64(b + p), p += 8; break;
        case 0xd0: NEED(1); o->t = T_INT, o->i = (int8_t)b[p], p += 1; break;
        case 0xd1: NEED(2); o->t = T_INT, o->i = (int16_t)be16(b + p), p += 2; break;
        case 0xd2: NEED(4); o->t = T_INT, o->i = (int32_t)be32(b + p), p += 4; break;
        case 0xd3: NEED(8); o->t = T_INT, o->i = (int64_t)be64(b + p), p += 8; break;
        case 0xd4: case 0xd5: case 0xd6: case 0xd7: case 0xd8:
            NEED(1);
            o->t = T_EXT, n = 1u << (c - 0xd4), o->i = (int8_t)b[p], p += 1;
            break;
        case 0xd9: NEED(1); o->t = T_STR, n = b[p], p += 1; break;
        case 0xda: NEED(2); o->t = T_STR, n = be16(b + p), p += 2; break;
        case 0xdb: NEED(4); o->t = T_STR, n = be32(b + p), p += 4; break;
        case 0xdc: NEED(2); o->t = T_ARR, o->n = be16(b + p), p += 2; break;
        case 0xdd: NEED(4); o->t = T_ARR, o->n = be32(b + p), p += 4; break;
        case 0xde: NEED(2); o->t = T_MAP, o->n = be16(b + p), p += 2; break;
        case 0xdf: NEED(4); o->t = T_MAP, o->n = be32(b + p), p += 4; break;
        default: return -1; /* 0xc1: never used */
        }
    }
#undef NEED
    if (o->t == T_INT && o->i >= 0) o->t = T_UINT, o->u = (uint64_t)o->i;
    if (o->t == T_STR || o->t == T_BIN || o->t == T_EXT) {
        if (len - p < n) return -1;
        o->p = b + p;
        o->n = n;
        p += n;
        if (o->t == T_STR && !utf8_ok(o->p, n)) return -1;
        if (o->t == T_EXT && o->i < -1) return -1; /* ExtType codes are 0..127; -1 is the Timestamp */
        if (o->t == T_EXT && o->i == -1) { /* msgpack's Timestamp: 32, 64 or 96 bits, ns < 1e9 */
            uint64_t ns;
            if (n == 4) ns = 0;
            else if (n == 8) ns = be64(o->p) >> 34;
            else if (n == 12) ns = be32(o->p);
            else return -1;
            if (ns > 999999999) return -1;
            o->t = T_TS;
        }
    }
    *pos = p;
    return 0;
}

/* The message as the Python worker sees it after unpackb: its length and first elements. */
typedef struct {
    int subscriptable; /* msg[0] and msg[1] exist */
    uint64_t n;        /* len(msg) */
    mpobj e[5];
    const uint8_t *body;
    size_t len;
    size_t off[5]; /* where e[k] starts in body (a top-level array's elements; else 0) */
} message;

/* Walk the whole body: exactly one valid object. Records the top-level array's first 5 elements. */
static int mp_message(const uint8_t *b, size_t len, message *m) {
    size_t pos = 0;
    mpobj o;
    m->subscriptable = 0;
    m->body = b;
    m->len = len;
    memset(m->off, 0, sizeof m->off);
    if (mp_head(b, len, &pos, &o)) return -1;
    if (o.t != T_ARR && o.t != T_MAP) {
        if (pos != len) return -1;
        /* str, bytes and ExtType are sequences to Python: msg[0] and msg[1] work on them too */
        if (o.t == T_STR) { /* msg[0] is its first character (only msg[0] is ever shown) */
            m->n = utf8_chars(o.p, o.n);
            size_t first = 1;
            while (first < o.n && (o.p[first] & 0xC0) == 0x80) first++;
            for (int k = 0; k < 5; k++) m->e[k] = (mpobj){.t = T_STR, .p = o.p, .n = first};
            m->subscriptable = m->n >= 2;
        } else if (o.t == T_BIN) {
            m->n = o.n;
            for (uint64_t k = 0; k < 5 && k < o.n; k++) m->e[k] = (mpobj){.t = T_UINT, .u = o.p[k]};
            m->subscriptable = m->n >= 2;
        } else if (o.t == T_EXT) {
            m->n = 2;
            m->e[0] = (mpobj){.t = T_UINT, .u = (uint64_t)o.i};
            m->e[1] = (mpobj){.t = T_BIN, .p = o.p, .n = o.n};
            m->subscriptable = 1;
        }
        return 0; /* None, bools, numbers, Timestamps: not subscriptable */
    }
    /* arrays and maps: iterate with an explicit stack of items left per open container */
    static uint64_t rem[MAX_DEPTH + 1];
    static uint8_t ismap[MAX_DEPTH + 1];
    int top_is_array = o.t == T_ARR;
    m->n = o.n;
    if (o.n == 0) {
        m->subscriptable = 0;
        return pos == len ? 0 : -1;
    }
    int top = 1;
    rem[0] = o.t == T_MAP ? 2 * o.n : o.n;
    ismap[0] = o.t == T_MAP;
    while (top > 0) {
        int is_key = ismap[top - 1] && (rem[top - 1] % 2 == 0);
        uint64_t idx = m->n - rem[0];
        mpobj x;
        size_t at = pos;
        if (mp_head(b, len, &pos, &x)) return -1;
        if (is_key && x.t != T_STR && x.t != T_BIN) return -1;
        if (top == 1 && top_is_array && idx < 5) m->e[idx] = x, m->off[idx] = at;
        rem[top - 1]--;
        if (x.t == T_ARR || x.t == T_MAP) {
            if (top >= MAX_DEPTH) return -1;
            uint64_t items = x.t == T_MAP ? 2 * x.n : x.n;
            if (items > len - pos) return -1; /* cannot fit: truncated */
            if (items) {
                rem[top] = items;
                ismap[top] = x.t == T_MAP;
                top++;
            }
        }
        while (top > 0 && rem[top - 1] == 0) top--;
    }
    if (pos != len) return -1;
    /* a dict: msg[0] is a KeyError (keys are str or bytes) */
    m->subscriptable = top_is_array && m->n >= 2;
    return 0;
}

/* Python's ``x == k`` for a decoded object and an int. */
static int num_eq(const mpobj *o, int64_t k) {
    switch (o->t) {
    case T_UINT: return k >= 0 && o->u == (uint64_t)k;
    case T_INT: return o->i == k;
    case T_BOOL: return o->i == k;
    case T_FLOAT: return o->f == (double)k;
    default: return 0;
    }
}

/* A request id a Python dict lookup of int keys would find: an integral number in [0, 2^32). */
static int as_id(const mpobj *o, uint32_t *id) {
    switch (o->t) {
    case T_UINT:
        if (o->u > 0xFFFFFFFFull) return 0;
        *id = (uint32_t)o->u;
        return 1;
    case T_BOOL: *id = (uint32_t)o->i; return 1;
    case T_FLOAT:
        if (!(o->f >= 0 && o->f <= 4294967295.0) || o->f != floor(o->f)) return 0;
        *id = (uint32_t)o->f;
        return 1;
    default: return 0;
    }
}

static int truthy(const mpobj *o) {
    switch (o->t) {
    case T_NIL: return 0;
    case T_BOOL: return o->i != 0;
    case T_UINT: return o->u != 0;
    case T_INT: return 1;
    case T_FLOAT: return o->f != 0.0;
    case T_STR: case T_BIN: case T_ARR: case T_MAP: return o->n != 0;
    default: return 1;
    }
}

/* Python's repr(float). */
static void py_float(sbuf *s, double v) {
    if (isnan(v)) return sputs(s, "nan");
    if (isinf(v)) return sputs(s, v > 0 ? "inf" : "-inf");
    if (v == 0) return sputs(s, signbit(v) ? "-0.0" : "0.0");
    char buf[64];
    int p;
    for (p = 1; p <= 17; p++) {
        snprintf(buf, sizeof buf, "%.*e", p - 1, v);
        if (strtod(buf, NULL) == v) break;
    }
    char digits[32];
    int nd = 0, neg = 0;
    char *q = buf;
    if (*q == '-') neg = 1, q++;
    for (; *q && *q != 'e'; q++)
        if (*q >= '0' && *q <= '9') digits[nd++] = *q;
    int e = atoi(q + 1);
    while (nd > 1 && digits[nd - 1] == '0') nd--;
    if (neg) sputs(s, "-");
    if (e < -4 || e >= 16) {
        sput(s, digits, 1);
        if (nd > 1) {
            sputs(s, ".");
            sput(s, digits + 1, nd - 1);
        }
        sprintf_(s, "e%c%02d", e < 0 ? '-' : '+', e < 0 ? -e : e);
    } else if (e >= 0) {
        if (nd <= e + 1) {
            sput(s, digits, nd);
            for (int k = nd; k < e + 1; k++) sputs(s, "0");
            sputs(s, ".0");
        } else {
            sput(s, digits, e + 1);
            sputs(s, ".");
            sput(s, digits + e + 1, nd - e - 1);
        }
    } else {
        sputs(s, "0.");
        for (int k = 0; k < -e - 1; k++) sputs(s, "0");
        sput(s, digits, nd);
    }
}

/* Python's repr of a str or bytes (quotes, escapes); close enough for error keys. */
static void py_quote(sbuf *s, const uint8_t *p, size_t n, int bytes) {
    int has_sq = memchr(p, '\'', n) != NULL, has_dq = memchr(p, '"', n) != NULL;
    char q = (has_sq && !has_dq) ? '"' : '\'';
    if (bytes) sputs(s, "b");
    sput(s, &q, 1);
    for (size_t i = 0; i < n; i++) {
        uint8_t c = p[i];
        if (c == (uint8_t)q || c == '\\') sprintf_(s, "\\%c", c);
        else if (c == '\n') sputs(s, "\\n");
        else if (c == '\r') sputs(s, "\\r");
        else if (c == '\t') sputs(s, "\\t");
        else if (c < 0x20 || c == 0x7f || (bytes && c >= 0x80)) sprintf_(s, "\\x%02x", c);
        else sput(s, &c, 1);
    }
    sput(s, &q, 1);
}

static void py_str(sbuf *s, const mpobj *o, int repr);

/* Python's repr of the (already validated) object at body[*pos]; advances *pos past it. */
static void py_repr_at(sbuf *s, const uint8_t *b, size_t len, size_t *pos) {
    mpobj o;
    if (mp_head(b, len, pos, &o)) { /* cannot happen: the body was walked already */
        sputs(s, "?");
        return;
    }
    if (o.t == T_ARR || o.t == T_MAP) {
        sputs(s, o.t == T_ARR ? "[" : "{");
        for (uint64_t i = 0; i < o.n; i++) {
            if (i) sputs(s, ", ");
            py_repr_at(s, b, len, pos);
            if (o.t == T_MAP) {
                sputs(s, ": ");
                py_repr_at(s, b, len, pos);
            }
        }
        sputs(s, o.t == T_ARR ? "]" : "}");
    } else {
        py_str(s, &o, 1);
    }
}

/* Python's str(x) (repr: repr(x)) of a decoded scalar or extension (containers: py_repr_at). */
static void py_str(sbuf *s, const mpobj *o, int repr) {
    switch (o->t) {
    case T_NIL: sputs(s, "None"); break;
    case T_BOOL: sputs(s, o->i ? "True" : "False"); break;
    case T_UINT: sprintf_(s, "%llu", (unsigned long long)o->u); break;
    case T_INT: sprintf_(s, "%lld", (long long)o->i); break;
    case T_FLOAT: py_float(s, o->f); break;
    case T_STR:
        if (repr) py_quote(s, o->p, o->n, 0);
        else sput(s, o->p, o->n);
        break;
    case T_BIN: py_quote(s, o->p, o->n, 1); break;
    case T_ARR: sputs(s, "[...]"); break; /* (with its bytes at hand, py_repr_at shows it whole) */
    case T_MAP: sputs(s, "{...}"); break;
    case T_EXT:
        sprintf_(s, "ExtType(code=%d, data=", (int)o->i);
        py_quote(s, o->p, o->n, 1);
        sputs(s, ")");
        break;
    default: { /* T_TS: msgpack's Timestamp.from_bytes */
        int64_t sec;
        uint64_t ns;
        if (o->n == 4) sec = be32(o->p), ns = 0;
        else if (o->n == 8) sec = (int64_t)(be64(o->p) & 0x3FFFFFFFFull), ns = be64(o->p) >> 34;
        else ns = be32(o->p), sec = (int64_t)be64(o->p + 4);
        sprintf_(s, "Timestamp(seconds=%lld, nanoseconds=%llu)", (long long)sec, (unsigned long long)ns);
    }
    }
}

/* str() (repr: repr()) of element k of the message, containers shown whole as Python would. */
static void py_str_elem(sbuf *s, const message *m, int k, int repr) {
    const mpobj *o = &m->e[k];
    if ((o->t == T_ARR || o->t == T_MAP) && m->off[k]) {
        size_t pos = m->off[k];
        py_repr_at(s, m->body, m->len, &pos);
    } else {
        py_str(s, o, repr);
    }
}

/* _error_key: "<code> <name>" of an ERROR message. */
static void error_key(sbuf *s, const message *m) {
    s->n = 0;
    if (m->n >= 4) {
        py_str_elem(s, m, 2, 0);
        sputs(s, " ");
        py_str_elem(s, m, 3, 0);
    } else {
        sputs(s, "malformed_error_reply");
    }
}

/* ------------------------------------------------------------ sending */
static void conn_lost(conn *c);
static void check_drained(void);

static void set_events(conn *c, int want_out) {
    if (c->want_out == want_out) return;
    struct epoll_event ev = {.events = EPOLLIN | (want_out ? EPOLLOUT : 0), .data.ptr = c};
    if (epoll_ctl(W.ep, EPOLL_CTL_MOD, c->fd, &ev) != 0) die("failed: epoll_ctl: %s", strerror(errno));
    c->want_out = want_out;
}

/* One write of what is pending (the rest waits for EPOLLOUT, like a transport's buffer). */
static void conn_flush(conn *c) {
    if (c->closed || c->out_off == c->out_len) return;
    ssize_t w = send(c->fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (w < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) w = 0;
        else return conn_lost(c);
    }
    c->out_off += (size_t)w;
    if (c->out_off == c->out_len) {
        c->out_off = c->out_len = 0;
        set_events(c, 0);
    } else {
        set_events(c, 1);
    }
}

static inline uint8_t *out_reserve(conn *c, size_t n) {
    if (c->out_len + n > c->out_cap) {
        if (c->out_off > 0) { /* drop what the kernel took */
            memmove(c->out, c->out + c->out_off, c->out_len - c->out_off);
            c->out_len -= c->out_off;
            c->out_off = 0;
        }
        if (c->out_len + n > c->out_cap) {
            size_t cap = c->out_cap ? c->out_cap : 65536;
            while (cap < c->out_len + n) cap *= 2;
            c->out = xrealloc(c->out, cap);
            c->out_cap = cap;
        }
    }
    uint8_t *p = c->out + c->out_len;
    c->out_len += n;
    return p;
}

/* Append the next template with ``id`` (and the stamp) to c's output. */
static inline void put_request(conn *c, uint32_t id) {
    int k = W.tmpl_k;
    size_t n = W.tmpl_len[k];
    uint8_t *p = out_reserve(c, n);
    memcpy(p, W.tmpl[k], n);
    if (++k == W.ntmpl) k = 0;
    W.tmpl_k = k;
    p[C.id_offset] = (uint8_t)(id >> 24);
    p[C.id_offset + 1] = (uint8_t)(id >> 16);
    p[C.id_offset + 2] = (uint8_t)(id >> 8);
    p[C.id_offset + 3] = (uint8_t)id;
    if (C.stamp_size) { /* _Worker._make_stamp: low 24 bits, then salt << 8 | the next 8 bits */
        uint64_t s = W.stamp_seq;
        W.stamp_seq = s + (uint64_t)C.workers;
        double a = (double)(s & 0xFFFFFF), b = (double)((uint64_t)(C.salt << 8) | ((s >> 24) & 0xFF));
        if (C.stamp_size == 4) {
            float fa = (float)a, fb = (float)b;
            memcpy(p + C.data_offset, &fa, 4);
            memcpy(p + C.data_offset + 4, &fb, 4);
        } else {
            memcpy(p + C.data_offset, &a, 8);
            memcpy(p + C.data_offset + 8, &b, 8);
        }
    }
}

/* Closed loop: send n requests on c now. */
static void send_closed(conn *c, int64_t n) {
    if (c->closed || c->stopped || n <= 0) return;
    int64_t t = now_ns();
    for (int64_t i = 0; i < n; i++) put_request(c, ring_put(c, t, t));
    W.outstanding += n;
    if (W.ws <= t && t < W.we) W.sent_in_window += n;
    if (!c->want_out) conn_flush(c);
}

/* -------------------------------------------------------- open loop */
static inline double rng_uniform(void) { /* splitmix64 -> [0, 1) */
    uint64_t z = (W.rng += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (double)(z >> 11) * (1.0 / 9007199254740992.0);
}

static int64_t sched_next(void) {
    if (C.poisson) {
        W.pois_acc += -log1p(-rng_uniform()) * W.period;
        return (int64_t)W.pois_acc;
    }
    return (int64_t)(W.sched_base + (double)(W.sched_k++) * W.period);
}

static void arm(int tfd, int64_t t) {
    if (t < 1) t = 1; /* all zero would disarm */
    struct itimerspec its = {.it_value = {.tv_sec = t / 1000000000, .tv_nsec = t % 1000000000}};
    if (timerfd_settime(tfd, TFD_TIMER_ABSTIME, &its, NULL) != 0) die("failed: timerfd_settime: %s", strerror(errno));
}

static void open_start(void) {
    W.rng = (uint64_t)(C.seed + 1000 + C.index);
    W.period = 1e9 / C.rate;
    /* workers interleave: worker i starts i/total_rate after worker 0 */
    W.sched_base = (double)W.t_start + (C.total_rate > 0 ? C.index * 1e9 / C.total_rate : 0.0);
    W.pois_acc = W.sched_base;
    W.sched_k = 0;
    W.next_conn = 0;
    W.next_t = sched_next();
    arm(W.send_tfd, W.next_t);
}

/* _Worker._fire: send everything due, one write per connection, round robin.
 * Returns 1 if it re-armed the timer (which clears the timerfd's expiry count: no read needed). */
static int fire(void) {
    if (!W.sending) return 0;
    int64_t now = now_ns(), t_send = now;
    int64_t ws = W.ws, we = W.we, cap = C.max_outstanding, n = 0;
    int c = W.next_conn, nconns = C.nconns;
    for (;;) {
        int64_t t = W.next_t;
        if (t > now || t >= we) break;
        W.next_t = sched_next();
        int in_window = t >= ws;
        if (in_window) W.scheduled_in_window++;
        if (W.outstanding + n >= cap) {
            W.skipped++;
            continue;
        }
        conn *cn = &W.conns[c];
        if (++c == nconns) c = 0;
        if (cn->closed || cn->stopped) {
            W.skipped++;
            continue;
        }
        put_request(cn, ring_put(cn, t, t_send));
        cn->touched = 1;
        n++;
        if (in_window) {
            W.sent_in_window++;
            vpush(&W.lags, t_send - t);
        }
    }
    W.next_conn = c;
    W.outstanding += n;
    for (int j = 0; j < nconns; j++) {
        conn *cn = &W.conns[j];
        if (cn->touched) {
            cn->touched = 0;
            if (!cn->want_out) conn_flush(cn);
        }
    }
    if (W.next_t < we) {
        int64_t at = now + C.quantum_ns;
        arm(W.send_tfd, W.next_t > at ? W.next_t : at);
        return 1;
    }
    W.sending = 0;
    return 0;
}

/* ------------------------------------------------------------ replies */
static sbuf keybuf;

typedef struct {
    int64_t done, results, defaults;
} batch;

static void on_frame(conn *c, const uint8_t *b, size_t n, int64_t t_recv, batch *bt) {
    message m;
    if (mp_message(b, n, &m) != 0 || !m.subscriptable) {
        count_error_s("malformed_reply");
        return;
    }
    const mpobj *kind = &m.e[0];
    uint32_t id;
    slot s;
    if (!as_id(&m.e[1], &id) || !ring_take(c, id, &s)) {
        /* An ERROR without a known id is about the connection, not a request. */
        if (num_eq(kind, C.wire_error)) {
            error_key(&keybuf, &m);
            count_error(keybuf.s, keybuf.n);
        } else {
            count_error_s("unmatched_reply");
        }
        return;
    }
    bt->done++;
    int64_t t0 = s.sched;
    int in_window = W.ws <= t0 && t0 < W.we;
    if (num_eq(kind, C.wire_result) && m.n >= 5) {
        if (in_window) {
            int64_t lat = t_recv - t0;
            vpush(&W.lat, lat);
            if (truthy(&m.e[4])) {
                bt->defaults++;
                vpush(&W.dflt, lat);
            } else {
                vpush(&W.good, lat);
            }
        }
        bt->results++;
    } else if (num_eq(kind, C.wire_error)) {
        error_key(&keybuf, &m);
        errent *e = err_get(keybuf.s, keybuf.n);
        count_error(keybuf.s, keybuf.n);
        if (C.nstop && m.n >= 3 && !c->stopped) {
            for (int k = 0; k < C.nstop; k++)
                if (num_eq(&m.e[2], C.stop_codes[k])) {
                    c->stopped = 1;
                    W.stopped_connections++;
                    break;
                }
        }
        if (in_window) {
            e->has_lat = 1;
            vpush(&e->lat, t_recv - t0);
            vpush(&e->sent_lat, t_recv - s.sent); /* the server's part, without the generator's lateness */
        }
    } else {
        keybuf.n = 0;
        sputs(&keybuf, "unexpected_reply_");
        py_str_elem(&keybuf, &m, 0, 1);
        count_error(keybuf.s, keybuf.n);
    }
}

static void on_readable(conn *c) {
    if (c->closed) return;
    if (c->in_cap - c->in_len < READ_CHUNK / 4) {
        if (c->in_off > 0) {
            memmove(c->in, c->in + c->in_off, c->in_len - c->in_off);
            c->in_len -= c->in_off;
            c->in_off = 0;
        }
        if (c->in_cap - c->in_len < READ_CHUNK / 4) {
            c->in_cap = c->in_cap * 2;
            c->in = xrealloc(c->in, c->in_cap);
        }
    }
    ssize_t r = recv(c->fd, c->in + c->in_len, c->in_cap - c->in_len, MSG_DONTWAIT);
    if (r < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return;
        return conn_lost(c);
    }
    if (r == 0) return conn_lost(c);
    int64_t t_recv = now_ns();
    c->in_len += (size_t)r;
    batch bt = {0, 0, 0};
    for (;;) {
        size_t avail = c->in_len - c->in_off;
        if (c->skip) {
            size_t take = avail < c->skip ? avail : (size_t)c->skip;
            c->skip -= take;
            c->in_off += take;
            if (c->skip) break;
            continue;
        }
        if (avail < 4) break;
        const uint8_t *p = c->in + c->in_off;
        uint32_t flen = be32(p);
        if (flen > MAX_REPLY_BYTES) {
            count_error_s("reply_too_large");
            c->in_off += 4;
            c->skip = flen;
            continue;
        }
        if (avail < 4 + (size_t)flen) {
            if (4 + (size_t)flen > c->in_cap) { /* room for the whole frame */
                memmove(c->in, c->in + c->in_off, avail);
                c->in_len = avail;
                c->in_off = 0;
                while (c->in_cap < 4 + (size_t)flen + READ_CHUNK / 4) c->in_cap *= 2;
                c->in = xrealloc(c->in, c->in_cap);
            }
            break;
        }
        on_frame(c, p + 4, flen, t_recv, &bt);
        c->in_off += 4 + (size_t)flen;
    }
    if (c->in_off == c->in_len) c->in_off = c->in_len = 0;
    if (!bt.done) return;
    W.outstanding -= bt.done;
    if (W.ws <= t_recv && t_recv < W.we) W.results_in_window += bt.results;
    W.defaults += bt.defaults;
    if (C.closed_loop) {
        if (W.sending) send_closed(c, bt.done);
        else if (W.outstanding == 0) check_drained();
    } else if (W.outstanding == 0 && !W.sending) {
        check_drained();
    }
}

static void conn_lost(conn *c) {
    if (c->closed) return;
    c->closed = 1;
    epoll_ctl(W.ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->fd = -1;
    count_error_s("connection_lost");
    if (c->inflight) {
        err_get("lost_in_flight", 14)->count += c->inflight;
        for (uint32_t id = c->lo; id != c->next_id; id++) {
            slot *s = &c->ring[id & c->mask];
            if (s->sent && W.lost_sent.n < MAX_LOST_TIMES) vpush(&W.lost_sent, s->sched);
            s->sent = 0;
        }
        W.outstanding -= c->inflight;
        c->inflight = 0;
        c->lo = c->next_id;
    }
    c->out_off = c->out_len = 0;
    check_drained();
}

/* ------------------------------------------------------------ the run */
static void begin_window(void) {
    W.w0 = now_ns();
    getrusage(RUSAGE_SELF, &W.ru0);
    W.begun = 1;
}

static void end_window(void) {
    W.w1 = now_ns();
    getrusage(RUSAGE_SELF, &W.ru1);
    W.ended = 1;
    W.sending = 0;
    check_drained();
}

static void check_drained(void) {
    if (!W.started || W.done || W.sending) return;
    int all_closed = 1;
    for (int i = 0; i < C.nconns; i++)
        if (!W.conns[i].closed) all_closed = 0;
    if (W.outstanding <= 0 || all_closed) W.done = 1;
}

static void start_sending(void) {
    W.sending = 1;
    W.started = 1;
    if (C.closed_loop) {
        for (int i = 0; i < C.nconns; i++) send_closed(&W.conns[i], C.concurrency);
    } else {
        open_start();
    }
}

static void arm_ctl(void) {
    int64_t t;
    switch (W.phase) {
    case 0: t = W.t_start; break;
    case 1: t = W.ws; break;
    case 2: t = W.we; break;
    default: t = W.deadline; break;
    }
    if (W.hard_deadline < t) t = W.hard_deadline;
    arm(W.ctl_tfd, t);
}

static void on_ctl(void) {
    int64_t now = now_ns();
    if (now >= W.hard_deadline) die("failed: TimeoutError: no end within the hard timeout");
    for (;;) {
        if (W.phase == 0 && now >= W.t_start) {
            W.phase = 1;
            start_sending();
        } else if (W.phase == 1 && now >= W.ws) {
            W.phase = 2;
            begin_window();
        } else if (W.phase == 2 && now >= W.we) {
            W.phase = 3;
            end_window();
        } else if (W.phase == 3 && now >= W.deadline) {
            W.phase = 4;
            W.done = 1;
            return;
        } else {
            break;
        }
    }
    arm_ctl();
}

static void run(void) {
    struct epoll_event evs[128];
    arm_ctl();
    while (!W.done) {
        int n = epoll_wait(W.ep, evs, 128, -1);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("failed: epoll_wait: %s", strerror(errno));
        }
        for (int i = 0; i < n && !W.done; i++) {
            void *ptr = evs[i].data.ptr;
            uint64_t ticks;
            if (ptr == &W.send_tfd) {
                if (!fire() && read(W.send_tfd, &ticks, 8) < 0 && errno != EAGAIN)
                    die("failed: read of the timerfd: %s", strerror(errno));
            } else if (ptr == &W.ctl_tfd) {
                if (read(W.ctl_tfd, &ticks, 8) == 8) on_ctl();
            } else {
                conn *c = ptr;
                if (evs[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP)) on_readable(c);
                if (!c->closed && (evs[i].events & EPOLLOUT)) conn_flush(c);
            }
        }
    }
    W.sending = 0;
    if (!W.ended) {
        W.w1 = now_ns();
        getrusage(RUSAGE_SELF, &W.ru1);
        W.ended = 1;
    }
}

/* ------------------------------------------------------------ set-up */
static int connect_one(char *err, size_t errlen) {
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *res = NULL;
    char port[16];
    snprintf(port, sizeof port, "%d", C.port);
    int rc = getaddrinfo(C.host, port, &hints, &res);
    if (rc != 0) {
        snprintf(err, errlen, "%s", gai_strerror(rc));
        return -1;
    }
    int fd = -1;
    snprintf(err, errlen, "no address");
    for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
        fd = socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, ai->ai_protocol);
        if (fd < 0) {
            snprintf(err, errlen, "%s", strerror(errno));
            continue;
        }
        int ok = connect(fd, ai->ai_addr, ai->ai_addrlen) == 0;
        if (!ok && errno == EINPROGRESS) {
            struct pollfd pfd = {.fd = fd, .events = POLLOUT};
            int64_t left_ms = C.connect_timeout_ns / 1000000;
            int pr = poll(&pfd, 1, left_ms > 0x7fffffff ? 0x7fffffff : (int)left_ms);
            if (pr == 0) {
                snprintf(err, errlen, "TimeoutError (no connection in %.1f s)", C.connect_timeout_ns / 1e9);
            } else if (pr > 0) {
                int soerr = 0;
                socklen_t sl = sizeof soerr;
                getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl);
                if (soerr == 0) ok = 1;
                else snprintf(err, errlen, "[Errno %d] %s", soerr, strerror(soerr));
            } else {
                snprintf(err, errlen, "%s", strerror(errno));
            }
        } else if (!ok) {
            snprintf(err, errlen, "[Errno %d] %s", errno, strerror(errno));
        }
        if (ok) break;
        close(fd);
        fd = -1;
    }
    freeaddrinfo(res);
    if (fd >= 0) {
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    return fd;
}

static void load_templates(void) {
    FILE *f = fopen(C.templates_path, "rb");
    if (!f) die("failed: cannot open templates %s: %s", C.templates_path, strerror(errno));
    uint32_t hdr[2];
    if (fread(hdr, 4, 2, f) != 2 || hdr[0] != 0x544c4343u /* "CCLT" */ || hdr[1] == 0)
        die("failed: %s is not a template file", C.templates_path);
    W.ntmpl = (int)hdr[1];
    W.tmpl = xrealloc(NULL, W.ntmpl * sizeof *W.tmpl);
    W.tmpl_len = xrealloc(NULL, W.ntmpl * sizeof *W.tmpl_len);
    for (int i = 0; i < W.ntmpl; i++) {
        uint32_t n;
        if (fread(&n, 4, 1, f) != 1) die("failed: truncated template file");
        W.tmpl_len[i] = n;
        W.tmpl[i] = xrealloc(NULL, n);
        if (fread(W.tmpl[i], 1, n, f) != n) die("failed: truncated template file");
        if (n < C.id_offset + 4 || (C.stamp_size && n < C.data_offset + 2 * (size_t)C.stamp_size))
            die("failed: template %d is too short (%u bytes)", i, n);
    }
    fclose(f);
    W.tmpl_k = C.template_start % W.ntmpl;
}

static int64_t int_arg(const char *k, const char *v) {
    char *end;
    errno = 0;
    long long x = strtoll(v, &end, 10);
    if (errno || *end || end == v) die("failed: bad integer %s=%s", k, v);
    return x;
}
static double float_arg(const char *k, const char *v) {
    char *end;
    double x = strtod(v, &end);
    if (*end || end == v) die("failed: bad number %s=%s", k, v);
    return x;
}

static void parse_args(int argc, char **argv) {
    C.host = "127.0.0.1";
    C.nconns = 1;
    C.concurrency = 1;
    C.workers = 1;
    C.max_outstanding = 200000;
    C.connect_timeout_ns = 10000000000LL;
    int have_port = 0;
    for (int i = 1; i < argc; i++) {
        char *eq = strchr(argv[i], '=');
        if (!eq) die("failed: argument %s is not key=value", argv[i]);
        *eq = 0;
        const char *k = argv[i], *v = eq + 1;
        if (!strcmp(k, "host")) C.host = v;
        else if (!strcmp(k, "port")) C.port = (int)int_arg(k, v), have_port = 1;
        else if (!strcmp(k, "mode")) {
            if (!strcmp(v, "closed")) C.closed_loop = 1;
            else if (!strcmp(v, "open")) C.closed_loop = 0;
            else die("failed: mode=%s", v);
        } else if (!strcmp(k, "arrivals")) {
            if (!strcmp(v, "poisson")) C.poisson = 1;
            else if (!strcmp(v, "uniform")) C.poisson = 0;
            else die("failed: arrivals=%s", v);
        } else if (!strcmp(k, "index")) C.index = (int)int_arg(k, v);
        else if (!strcmp(k, "workers")) C.workers = (int)int_arg(k, v);
        else if (!strcmp(k, "connections")) C.nconns = (int)int_arg(k, v);
        else if (!strcmp(k, "concurrency")) C.concurrency = (int)int_arg(k, v);
        else if (!strcmp(k, "rate")) C.rate = float_arg(k, v);
        else if (!strcmp(k, "total_rate")) C.total_rate = float_arg(k, v);
        else if (!strcmp(k, "seed")) C.seed = int_arg(k, v);
        else if (!strcmp(k, "warmup_ns")) C.warmup_ns = int_arg(k, v);
        else if (!strcmp(k, "duration_ns")) C.duration_ns = int_arg(k, v);
        else if (!strcmp(k, "drain_ns")) C.drain_ns = int_arg(k, v);
        else if (!strcmp(k, "connect_timeout_ns")) C.connect_timeout_ns = int_arg(k, v);
        else if (!strcmp(k, "hard_timeout_ns")) C.hard_timeout_ns = int_arg(k, v);
        else if (!strcmp(k, "quantum_ns")) C.quantum_ns = int_arg(k, v);
        else if (!strcmp(k, "max_outstanding")) C.max_outstanding = int_arg(k, v);
        else if (!strcmp(k, "templates")) C.templates_path = v;
        else if (!strcmp(k, "template_start")) C.template_start = (int)int_arg(k, v);
        else if (!strcmp(k, "id_offset")) C.id_offset = (size_t)int_arg(k, v);
        else if (!strcmp(k, "data_offset")) C.data_offset = (size_t)int_arg(k, v);
        else if (!strcmp(k, "stamp")) C.stamp_size = (int)int_arg(k, v);
        else if (!strcmp(k, "salt")) C.salt = int_arg(k, v);
        else if (!strcmp(k, "wire_result")) C.wire_result = int_arg(k, v);
        else if (!strcmp(k, "wire_error")) C.wire_error = int_arg(k, v);
        else if (!strcmp(k, "stop_codes")) {
            char *s = (char *)v, *tok, *save = NULL;
            for (tok = strtok_r(s, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
                if (C.nstop == 64) die("failed: over 64 stop codes");
                C.stop_codes[C.nstop++] = int_arg(k, tok);
            }
        } else if (!strcmp(k, "out")) C.out_dir = v;
        else die("failed: unknown argument %s", k);
    }
    if (!have_port || !C.templates_path || !C.out_dir) die("failed: port=, templates= and out= are required");
    if (C.nconns < 1 || C.workers < 1 || C.index < 0) die("failed: connections, workers must be >= 1");
    if (C.closed_loop && C.concurrency < 1) die("failed: concurrency must be >= 1");
    if (!C.closed_loop && !(C.rate > 0)) die("failed: open loop needs rate > 0");
    if (C.stamp_size != 0 && C.stamp_size != 4 && C.stamp_size != 8) die("failed: stamp must be 0, 4 or 8");
    if (C.hard_timeout_ns <= 0) C.hard_timeout_ns = C.connect_timeout_ns + C.warmup_ns + C.duration_ns + C.drain_ns + 30000000000LL;
}

/* ------------------------------------------------------------ output */
static void write_file(const char *name, const void *p, size_t n) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", C.out_dir, name);
    FILE *f = fopen(path, "wb");
    if (!f || (n && fwrite(p, 1, n, f) != n) || fclose(f) != 0)
        die("failed: cannot write %s: %s", path, strerror(errno));
}

static void write_vec(const char *name, const vec *v) { write_file(name, v->a, v->n * sizeof(int64_t)); }

static void write_report(void) {
    write_vec("latencies.i64", &W.lat);
    write_vec("good.i64", &W.good);
    write_vec("default.i64", &W.dflt);
    write_vec("lags.i64", &W.lags);
    write_vec("lost_sent.i64", &W.lost_sent);
    sbuf b = {0};
    for (size_t i = 0; i < W.ecount; i++) {
        errent *e = W.eorder[i];
        uint32_t kl = (uint32_t)e->klen;
        sput(&b, &kl, 4);
        sput(&b, e->key, e->klen);
        sput(&b, &e->count, 8);
        uint8_t has = (uint8_t)e->has_lat;
        sput(&b, &has, 1);
        if (has) {
            uint64_t n = e->lat.n;
            sput(&b, &n, 8);
            sput(&b, e->lat.a, n * 8);
            n = e->sent_lat.n;
            sput(&b, &n, 8);
            sput(&b, e->sent_lat.a, n * 8);
        }
    }
    write_file("errors.bin", b.s, b.n);
    int64_t unfinished = 0;
    for (int i = 0; i < C.nconns; i++) {
        conn *c = &W.conns[i];
        for (uint32_t id = c->lo; id != c->next_id; id++) {
            slot *s = &c->ring[id & c->mask];
            if (s->sent && W.ws <= s->sched && s->sched < W.we) unfinished++;
        }
    }
    b.n = 0;
    sprintf_(&b, "errors_in_window=%lld\n", (long long)W.errors_in_window);
    sprintf_(&b, "defaults=%lld\n", (long long)W.defaults);
    sprintf_(&b, "sent_in_window=%lld\n", (long long)W.sent_in_window);
    sprintf_(&b, "scheduled_in_window=%lld\n", (long long)W.scheduled_in_window);
    sprintf_(&b, "results_in_window=%lld\n", (long long)W.results_in_window);
    sprintf_(&b, "skipped=%lld\n", (long long)W.skipped);
    sprintf_(&b, "stopped_connections=%lld\n", (long long)W.stopped_connections);
    sprintf_(&b, "unfinished=%lld\n", (long long)unfinished);
    if (W.begun && W.ended) {
        int64_t uu = (W.ru1.ru_utime.tv_sec - W.ru0.ru_utime.tv_sec) * 1000000LL + (W.ru1.ru_utime.tv_usec - W.ru0.ru_utime.tv_usec);
        int64_t su = (W.ru1.ru_stime.tv_sec - W.ru0.ru_stime.tv_sec) * 1000000LL + (W.ru1.ru_stime.tv_usec - W.ru0.ru_stime.tv_usec);
        sprintf_(&b, "cpu_user_us=%lld\n", (long long)uu);
        sprintf_(&b, "cpu_sys_us=%lld\n", (long long)su);
        sprintf_(&b, "window_ns=%lld\n", (long long)(W.w1 - W.w0));
    }
    write_file("scalars.txt", b.s, b.n);
    free(b.s);
}

/* ------------------------------------------------------------ main */
int main(int argc, char **argv) {
    signal(SIGPIPE, SIG_IGN);
    parse_args(argc, argv);
    /* last resort: the process ends itself even if it is wedged */
    alarm((unsigned)(C.hard_timeout_ns / 1000000000LL) + 5);
    load_templates();
    W.stamp_seq = (uint64_t)C.index;
    W.ws = W.we = INT64_MAX / 2; /* until the start time is known */

    W.ep = epoll_create1(EPOLL_CLOEXEC);
    if (W.ep < 0) die("failed: epoll_create1: %s", strerror(errno));
    W.conns = calloc((size_t)C.nconns, sizeof(conn));
    if (!W.conns) die("failed: out of memory");
    uint32_t ring0 = 1024;
    while (C.closed_loop && ring0 < (uint32_t)C.concurrency * 2) ring0 *= 2;
    for (int i = 0; i < C.nconns; i++) {
        conn *c = &W.conns[i];
        char err[512];
        c->fd = connect_one(err, sizeof err);
        if (c->fd < 0) die("cannot connect to %s:%d: %s", C.host, C.port, err);
        ring_init(c, ring0);
        c->in_cap = READ_CHUNK;
        c->in = xrealloc(NULL, c->in_cap);
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        if (epoll_ctl(W.ep, EPOLL_CTL_ADD, c->fd, &ev) != 0) die("failed: epoll_ctl: %s", strerror(errno));
    }
    W.send_tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    W.ctl_tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    if (W.send_tfd < 0 || W.ctl_tfd < 0) die("failed: timerfd_create: %s", strerror(errno));
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &W.send_tfd};
    epoll_ctl(W.ep, EPOLL_CTL_ADD, W.send_tfd, &ev);
    ev.data.ptr = &W.ctl_tfd;
    epoll_ctl(W.ep, EPOLL_CTL_ADD, W.ctl_tfd, &ev);

    /* handshake: "ready", then "start <t_start_ns>" */
    if (printf("ready\n") < 0 || fflush(stdout) != 0) die("failed: cannot write to stdout");
    struct pollfd pfd = {.fd = 0, .events = POLLIN};
    int wait_ms = (int)(C.connect_timeout_ns / 1000000) + 30000;
    char line[128];
    size_t got = 0;
    int64_t until = now_ns() + (int64_t)wait_ms * 1000000;
    while (got == 0 || line[got - 1] != '\n') {
        int64_t left = (until - now_ns()) / 1000000;
        if (left <= 0 || poll(&pfd, 1, (int)left) <= 0) die("failed: no start command from the parent in time");
        ssize_t r = read(0, line + got, sizeof line - 1 - got);
        if (r <= 0) die("failed: the parent closed stdin before the start command");
        got += (size_t)r;
        if (got >= sizeof line - 1) break;
    }
    line[got] = 0;
    long long t_start;
    if (sscanf(line, "start %lld", &t_start) != 1) die("failed: expected \"start <ns>\", got %.40s", line);
    W.hard_deadline = now_ns() + C.hard_timeout_ns;
    W.t_start = t_start;
    W.ws = W.t_start + C.warmup_ns;
    W.we = W.ws + C.duration_ns;
    W.deadline = W.we + C.drain_ns;
    W.phase = 0;
    run();
    write_report();
    for (int i = 0; i < C.nconns; i++)
        if (!W.conns[i].closed) close(W.conns[i].fd);
    return 0;
}
