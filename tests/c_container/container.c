/*
 * A Clipper model container in C, written from docs/container-protocol.md
 * alone: no Clipper code, only libzmq and msgpack-c.
 *
 * It serves a linear model y = W x + b (W: k x d, b: k) over float32 inputs
 * of shape [d], answering float64 outputs: one number per input when k = 1,
 * a vector of k per input otherwise.
 *
 *   container [--credentials FILE] --weights FILE [--name MODEL] [--version V]
 *             [--frontend ADDR] [--verbose] [--no-heartbeat]
 *
 * The credentials file is the JSON `clipper container-credentials` writes
 * (mechanism curve, plain or none); without --credentials, the file named by
 * $CLIPPER_CREDENTIALS_FILE (the Kubernetes manager's), else the document in
 * $CLIPPER_CREDENTIALS (how the local manager hands it to a deployment's
 * `command`); both are then removed from the environment.
 * The frontend's address: --frontend, else the credentials' "frontend", else
 * $CLIPPER_FRONTEND (its first address), else tcp://127.0.0.1:7000. The weights file is text: "k d", then the
 * k*d entries of W row by row, then the k entries of b.
 *
 * Exit codes (as the reference SDK's): 0 stopped (SIGTERM/SIGINT, after
 * C_BYE), 2 refused (handshake, F_REJECT, unusable credentials or arguments),
 * 3 the model could not be loaded.
 */

#define _GNU_SOURCE
#include <endian.h>
#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <msgpack.h>
#include <zmq.h>

/* docs/container-protocol.md, "Constants" */
#define RPC_VERSION 1
#define C_HELLO 1
#define C_HEARTBEAT 2
#define C_RESULT 3
#define C_ERROR 4
#define C_BYE 5
#define F_WELCOME 1
#define F_BATCH 2
#define F_HEARTBEAT 3
#define F_REJECT 4
#define F_REHELLO 5
#define MODEL_ERROR 301
#define EXIT_OK 0
#define EXIT_REJECTED 2
#define EXIT_LOAD_FAILED 3
#define MAX_HANDSHAKE_FAILURES 5

static const char *g_name = NULL, *g_version = NULL;  /* known once the arguments and credentials are read */
static int g_verbose = 0;
static volatile sig_atomic_t g_stop = 0;

static void say(const char *fmt, ...) {
    va_list ap;
    if (g_name && g_version) fprintf(stderr, "c-container %s:%s: ", g_name, g_version);
    else fprintf(stderr, "c-container: ");
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    fflush(stderr);
}

static void on_signal(int sig) { (void)sig; g_stop = 1; }

static int64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* ------------------------------------------------------------------ a small JSON reader
 * Enough JSON for a credentials file: one object whose values we need are
 * strings or null; any other value (numbers, nested objects) is skipped
 * correctly. Strings are decoded (escapes, \uXXXX with surrogate pairs). */

#define MAX_FIELDS 32
typedef struct { char *key; char *str; int is_null; char number[32]; } field_t;
typedef struct { const char *p, *end; } json_t;

static void ws(json_t *j) { while (j->p < j->end && strchr(" \t\r\n", *j->p)) j->p++; }

static void put_utf8(char **o, unsigned cp) {
    char *q = *o;
    if (cp < 0x80) *q++ = (char)cp;
    else if (cp < 0x800) { *q++ = (char)(0xC0 | cp >> 6); *q++ = (char)(0x80 | (cp & 0x3F)); }
    else if (cp < 0x10000) { *q++ = (char)(0xE0 | cp >> 12); *q++ = (char)(0x80 | (cp >> 6 & 0x3F));
                             *q++ = (char)(0x80 | (cp & 0x3F)); }
    else { *q++ = (char)(0xF0 | cp >> 18); *q++ = (char)(0x80 | (cp >> 12 & 0x3F));
           *q++ = (char)(0x80 | (cp >> 6 & 0x3F)); *q++ = (char)(0x80 | (cp & 0x3F)); }
    *o = q;
}

static int hex4(const char *s, unsigned *out) {
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        char c = s[i];
        v <<= 4;
        if (c >= '0' && c <= '9') v |= (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f') v |= (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F') v |= (unsigned)(c - 'A' + 10);
        else return -1;
    }
    *out = v;
    return 0;
}

/* A string at j->p (after ws); returns a malloc'd UTF-8 copy, or NULL. */
static char *json_string(json_t *j) {
    if (j->p >= j->end || *j->p != '"') return NULL;
    j->p++;
    char *out = malloc((size_t)(j->end - j->p) + 1), *o = out;  /* decoding never grows a string */
    while (j->p < j->end && *j->p != '"') {
        unsigned char c = (unsigned char)*j->p++;
        if (c < 0x20) { free(out); return NULL; }
        if (c != '\\') { *o++ = (char)c; continue; }
        if (j->p >= j->end) { free(out); return NULL; }
        char e = *j->p++;
        switch (e) {
        case '"': *o++ = '"'; break;
        case '\\': *o++ = '\\'; break;
        case '/': *o++ = '/'; break;
        case 'b': *o++ = '\b'; break;
        case 'f': *o++ = '\f'; break;
        case 'n': *o++ = '\n'; break;
        case 'r': *o++ = '\r'; break;
        case 't': *o++ = '\t'; break;
        case 'u': {
            unsigned cp, lo;
            if (j->end - j->p < 4 || hex4(j->p, &cp)) { free(out); return NULL; }
            j->p += 4;
            if (cp >= 0xD800 && cp < 0xDC00) {
                if (j->end - j->p < 6 || j->p[0] != '\\' || j->p[1] != 'u' || hex4(j->p + 2, &lo)
                    || lo < 0xDC00 || lo >= 0xE000) { free(out); return NULL; }
                j->p += 6;
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            }
            put_utf8(&o, cp);
            break;
        }
        default: free(out); return NULL;
        }
    }
    if (j->p >= j->end) { free(out); return NULL; }
    j->p++;
    *o = 0;
    return out;
}

static int json_skip(json_t *j, int depth);

static int json_skip_container(json_t *j, int depth, char close) {
    j->p++;
    ws(j);
    if (j->p < j->end && *j->p == close) { j->p++; return 0; }
    for (;;) {
        ws(j);
        if (close == '}') {
            char *k = json_string(j);
            if (!k) return -1;
            free(k);
            ws(j);
            if (j->p >= j->end || *j->p++ != ':') return -1;
        }
        if (json_skip(j, depth + 1)) return -1;
        ws(j);
        if (j->p >= j->end) return -1;
        if (*j->p == ',') { j->p++; continue; }
        if (*j->p == close) { j->p++; return 0; }
        return -1;
    }
}

static int json_skip(json_t *j, int depth) {
    ws(j);
    if (j->p >= j->end || depth > 64) return -1;
    char c = *j->p;
    if (c == '"') { char *s = json_string(j); if (!s) return -1; free(s); return 0; }
    if (c == '{') return json_skip_container(j, depth, '}');
    if (c == '[') return json_skip_container(j, depth, ']');
    static const char *words[] = {"true", "false", "null"};
    for (int i = 0; i < 3; i++) {
        size_t n = strlen(words[i]);
        if ((size_t)(j->end - j->p) >= n && !memcmp(j->p, words[i], n)) { j->p += n; return 0; }
    }
    const char *start = j->p;
    while (j->p < j->end && strchr("+-0123456789.eE", *j->p)) j->p++;
    return j->p == start ? -1 : 0;
}

/* Parse a top-level object into fields; 0 on success. */
static int json_object(const char *text, size_t len, field_t *fields, int *n) {
    json_t j = {text, text + len};
    *n = 0;
    ws(&j);
    if (j.p >= j.end || *j.p != '{') return -1;
    j.p++;
    ws(&j);
    if (j.p < j.end && *j.p == '}') { j.p++; goto done; }
    for (;;) {
        ws(&j);
        char *key = json_string(&j);
        if (!key) return -1;
        ws(&j);
        if (j.p >= j.end || *j.p++ != ':') { free(key); return -1; }
        ws(&j);
        field_t f = {key, NULL, 0, {0}};
        const char *start = j.p;
        if (j.p < j.end && *j.p == '"') {
            if (!(f.str = json_string(&j))) { free(key); return -1; }
        } else {
            if (json_skip(&j, 0)) { free(key); return -1; }
            f.is_null = (j.p - start == 4 && !memcmp(start, "null", 4));
            size_t nlen = (size_t)(j.p - start);
            if (nlen < sizeof f.number) { memcpy(f.number, start, nlen); f.number[nlen] = 0; }
        }
        if (*n < MAX_FIELDS) fields[(*n)++] = f;
        else { free(f.key); free(f.str); }
        ws(&j);
        if (j.p < j.end && *j.p == ',') { j.p++; continue; }
        if (j.p < j.end && *j.p == '}') { j.p++; break; }
        return -1;
    }
done:
    ws(&j);
    return j.p == j.end ? 0 : -1;
}

static field_t *field(field_t *fields, int n, const char *key) {
    for (int i = 0; i < n; i++)
        if (!strcmp(fields[i].key, key)) return &fields[i];
    return NULL;
}

static char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    size_t cap = 4096, n = 0;
    char *buf = malloc(cap + 1);
    size_t got;
    while ((got = fread(buf + n, 1, cap - n, f)) > 0) {
        n += got;
        if (n == cap) { cap *= 2; buf = realloc(buf, cap + 1); }
    }
    fclose(f);
    buf[n] = 0;
    *len = n;
    return buf;
}

/* ------------------------------------------------------------------ credentials and model */

typedef struct {
    char *id, *model, *version, *frontend, *mechanism;
    char *server_public_key, *public_key, *secret_key, *password;
} creds_t;

/* The credentials document `text` (from the file `path`, or the environment); 0 when usable. */
static int parse_credentials(char *text, size_t len, const char *path, creds_t *c) {
    field_t fs[MAX_FIELDS];
    int n;
    if (json_object(text, len, fs, &n)) { say("credentials %s are not a JSON object", path); return -1; }
    field_t *kind = field(fs, n, "kind"), *format = field(fs, n, "format");
    if (!kind || !kind->str || strcmp(kind->str, "clipper-container-credentials")) {
        say("%s are not Clipper container credentials (no \"kind\": \"clipper-container-credentials\")", path);
        return -1;
    }
    if (!format || strcmp(format->number, "1")) {
        say("credentials %s have format %s; this container reads format 1", path, format ? format->number : "?");
        return -1;
    }
#define STR(name) (field(fs, n, name) ? field(fs, n, name)->str : NULL)
    c->id = STR("id"); c->model = STR("model"); c->version = STR("version"); c->frontend = STR("frontend");
    c->mechanism = STR("mechanism"); c->server_public_key = STR("server_public_key");
    c->public_key = STR("public_key"); c->secret_key = STR("secret_key"); c->password = STR("password");
#undef STR
    if (!c->id || !*c->id || strlen(c->id) > 64) { say("credentials %s: no credential id", path); return -1; }
    if (!c->model || !*c->model) { say("credentials %s: no model", path); return -1; }
    if (!c->mechanism) { say("credentials %s: no mechanism", path); return -1; }
    if (!strcmp(c->mechanism, "curve")) {
        const char *keys[] = {c->server_public_key, c->public_key, c->secret_key};
        const char *names[] = {"server_public_key", "public_key", "secret_key"};
        for (int i = 0; i < 3; i++)
            if (!keys[i] || strlen(keys[i]) != 40) {
                say("credentials %s: %s is not a CURVE key (40 characters of Z85 text)", path, names[i]);
                return -1;
            }
    } else if (!strcmp(c->mechanism, "plain")) {
        if (!c->password || strlen(c->password) < 16) { say("credentials %s: no password", path); return -1; }
    } else if (strcmp(c->mechanism, "none")) {
        say("credentials %s: mechanism %s is not 'curve', 'plain' or 'none'", path, c->mechanism);
        return -1;
    }
    return 0;
}

static int load_credentials(const char *path, creds_t *c) {
    size_t len;
    char *text;
    if (path) {
        text = read_file(path, &len);
        if (!text) { say("cannot read the credentials file %s: %s", path, strerror(errno)); return -1; }
    } else if (getenv("CLIPPER_CREDENTIALS_FILE")) {  /* the Kubernetes manager's Secret, mounted */
        static char from_env[4096];
        snprintf(from_env, sizeof from_env, "%s", getenv("CLIPPER_CREDENTIALS_FILE"));
        unsetenv("CLIPPER_CREDENTIALS_FILE");
        unsetenv("CLIPPER_CREDENTIALS");
        return load_credentials(from_env, c);
    } else {
        const char *env = getenv("CLIPPER_CREDENTIALS");
        if (!env) {
            say("no credentials: give --credentials FILE (or $CLIPPER_CREDENTIALS_FILE, $CLIPPER_CREDENTIALS)");
            return -1;
        }
        text = strdup(env);
        len = strlen(text);
        unsetenv("CLIPPER_CREDENTIALS");  /* the model's code and its children do not inherit it */
        path = "$CLIPPER_CREDENTIALS";
    }
    int rc = parse_credentials(text, len, path, c);
    free(text);
    return rc;
}

typedef struct { int k, d; double *w, *b; } model_t;

static int load_model(const char *path, model_t *mdl) {
    FILE *f = fopen(path, "r");
    if (!f) { say("cannot read the weights file %s: %s", path, strerror(errno)); return -1; }
    if (fscanf(f, "%d %d", &mdl->k, &mdl->d) != 2 || mdl->k < 1 || mdl->d < 1 || mdl->k > 4096 || mdl->d > 1 << 20) {
        say("weights file %s does not start with \"k d\"", path);
        fclose(f);
        return -1;
    }
    mdl->w = malloc(sizeof(double) * (size_t)mdl->k * (size_t)mdl->d);
    mdl->b = malloc(sizeof(double) * (size_t)mdl->k);
    for (long i = 0; i < (long)mdl->k * mdl->d; i++)
        if (fscanf(f, "%lf", &mdl->w[i]) != 1) { say("weights file %s: too few weights", path); fclose(f); return -1; }
    for (int i = 0; i < mdl->k; i++)
        if (fscanf(f, "%lf", &mdl->b[i]) != 1) { say("weights file %s: too few biases", path); fclose(f); return -1; }
    fclose(f);
    return 0;
}

/* ------------------------------------------------------------------ messages */

static int send_buf(void *sock, const void *data, size_t len, int more) {
    return zmq_send(sock, data, len, (more ? ZMQ_SNDMORE : 0) | ZMQ_DONTWAIT) < 0 ? -1 : 0;
}

static void pack_str(msgpack_packer *pk, const char *s) {
    size_t n = strlen(s);
    msgpack_pack_str(pk, n);
    msgpack_pack_str_body(pk, s, n);
}

static void send_header_only(void *sock, int kind) {
    msgpack_sbuffer sb;
    msgpack_packer pk;
    msgpack_sbuffer_init(&sb);
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    msgpack_pack_array(&pk, 1);
    msgpack_pack_int(&pk, kind);
    send_buf(sock, sb.data, sb.size, 0);
    msgpack_sbuffer_destroy(&sb);
}

static void send_hello(void *sock, const creds_t *c, const model_t *mdl) {
    msgpack_sbuffer sb;
    msgpack_packer pk;
    msgpack_sbuffer_init(&sb);
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    msgpack_pack_array(&pk, 3);
    msgpack_pack_int(&pk, C_HELLO);
    msgpack_pack_int(&pk, RPC_VERSION);
    msgpack_pack_map(&pk, 7);
    pack_str(&pk, "model"); pack_str(&pk, g_name);
    pack_str(&pk, "version"); pack_str(&pk, g_version);
    pack_str(&pk, "pid"); msgpack_pack_int(&pk, (int)getpid());
    pack_str(&pk, "sdk"); pack_str(&pk, "clipper-c-container/0.1");
    pack_str(&pk, "credential_id"); pack_str(&pk, c->id);
    pack_str(&pk, "input_dtype"); pack_str(&pk, "float32");
    pack_str(&pk, "input_shape"); msgpack_pack_array(&pk, 1); msgpack_pack_int(&pk, mdl->d);
    send_buf(sock, sb.data, sb.size, 0);
    msgpack_sbuffer_destroy(&sb);
}

static void send_error(void *sock, uint64_t batch_id, const char *message) {
    msgpack_sbuffer sb;
    msgpack_packer pk;
    msgpack_sbuffer_init(&sb);
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    msgpack_pack_array(&pk, 4);
    msgpack_pack_int(&pk, C_ERROR);
    msgpack_pack_uint64(&pk, batch_id);
    msgpack_pack_int(&pk, MODEL_ERROR);
    pack_str(&pk, message);
    send_buf(sock, sb.data, sb.size, 0);
    msgpack_sbuffer_destroy(&sb);
}

static int is_str(const msgpack_object *o, const char *s) {
    return o->type == MSGPACK_OBJECT_STR && o->via.str.size == strlen(s) && !memcmp(o->via.str.ptr, s, o->via.str.size);
}

static int is_uint(const msgpack_object *o) { return o->type == MSGPACK_OBJECT_POSITIVE_INTEGER; }

/* F_BATCH [2, batch_id, count, encoding, meta] + payload: run the model, answer C_RESULT or C_ERROR.
 * It runs on the one thread that also beats: fine for a model that takes microseconds. A model that may run
 * longer than heartbeat_interval_ms must keep beating meanwhile (another thread, with its own socket lock). */
static void on_batch(void *sock, const msgpack_object_array *h, zmq_msg_t *payload, const model_t *mdl) {
    if (h->size != 5 || !is_uint(&h->ptr[1]) || !is_uint(&h->ptr[2])) {
        say("a malformed batch header: ignored");
        return;
    }
    uint64_t batch_id = h->ptr[1].via.u64, count = h->ptr[2].via.u64;
    const msgpack_object *enc = &h->ptr[3], *meta = &h->ptr[4];
    char why[256];
    if (!is_str(enc, "nd") || meta->type != MSGPACK_OBJECT_ARRAY || meta->via.array.size != 2
        || !is_str(&meta->via.array.ptr[0], "<f4")) {
        snprintf(why, sizeof why, "this container takes float32 inputs of shape [%d] (encoding \"nd\", \"<f4\")", mdl->d);
        send_error(sock, batch_id, why);
        return;
    }
    const msgpack_object *shape = &meta->via.array.ptr[1];
    if (shape->type != MSGPACK_OBJECT_ARRAY || shape->via.array.size != 2 || !is_uint(&shape->via.array.ptr[0])
        || !is_uint(&shape->via.array.ptr[1]) || shape->via.array.ptr[0].via.u64 != count
        || shape->via.array.ptr[1].via.u64 != (uint64_t)mdl->d || count == 0 || count > (1u << 24)) {
        snprintf(why, sizeof why, "batch shape is not [%llu, %d]", (unsigned long long)count, mdl->d);
        send_error(sock, batch_id, why);
        return;
    }
    size_t need = (size_t)count * (size_t)mdl->d * 4;
    if (!payload || zmq_msg_size(payload) != need) {
        snprintf(why, sizeof why, "batch payload holds %zu bytes, not %zu", payload ? zmq_msg_size(payload) : 0, need);
        send_error(sock, batch_id, why);
        return;
    }
    if (g_verbose) say("batch %llu: %llu inputs", (unsigned long long)batch_id, (unsigned long long)count);
    const unsigned char *in = zmq_msg_data(payload);
    size_t nout = (size_t)count * (size_t)mdl->k;
    unsigned char *out = malloc(nout * 8);
    float *x = malloc(sizeof(float) * (size_t)mdl->d);
    for (uint64_t i = 0; i < count; i++) {
        for (int j = 0; j < mdl->d; j++) {  /* little-endian float32, maybe unaligned */
            uint32_t bits;
            memcpy(&bits, in + (i * (uint64_t)mdl->d + (uint64_t)j) * 4, 4);
            bits = le32toh(bits);
            memcpy(&x[j], &bits, 4);
        }
        for (int r = 0; r < mdl->k; r++) {
            double y = mdl->b[r];
            for (int j = 0; j < mdl->d; j++) y += mdl->w[(size_t)r * (size_t)mdl->d + (size_t)j] * (double)x[j];
            uint64_t bits;
            memcpy(&bits, &y, 8);
            bits = htole64(bits);
            memcpy(out + (i * (uint64_t)mdl->k + (uint64_t)r) * 8, &bits, 8);
        }
    }
    free(x);
    msgpack_sbuffer sb;
    msgpack_packer pk;
    msgpack_sbuffer_init(&sb);
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    msgpack_pack_array(&pk, 5);
    msgpack_pack_int(&pk, C_RESULT);
    msgpack_pack_uint64(&pk, batch_id);
    msgpack_pack_uint64(&pk, count);
    pack_str(&pk, "nd");
    msgpack_pack_array(&pk, 2);
    pack_str(&pk, "<f8");
    msgpack_pack_array(&pk, mdl->k == 1 ? 1 : 2);  /* k = 1: one number per input */
    msgpack_pack_uint64(&pk, count);
    if (mdl->k != 1) msgpack_pack_int(&pk, mdl->k);
    send_buf(sock, sb.data, sb.size, 1);
    send_buf(sock, out, nout * 8, 0);
    msgpack_sbuffer_destroy(&sb);
    free(out);
}

/* ------------------------------------------------------------------ the connection */

typedef struct {
    void *ctx, *sock, *mon;
    const char *frontend;
    const creds_t *creds;
    const model_t *mdl;
    int interval_ms, timeout_ms, handshake_failures, connections;
    int64_t last_heard, next_beat;
} link_t;

static void close_link(link_t *l, int goodbye) {
    if (l->mon) { zmq_socket_monitor(l->sock, NULL, 0); zmq_close(l->mon); l->mon = NULL; }
    if (l->sock) {
        if (goodbye) {
            send_header_only(l->sock, C_BYE);
            int linger = 100;
            zmq_setsockopt(l->sock, ZMQ_LINGER, &linger, sizeof linger);
        }
        zmq_close(l->sock);
        l->sock = NULL;
    }
}

static int open_link(link_t *l) {
    const creds_t *c = l->creds;
    l->sock = zmq_socket(l->ctx, ZMQ_DEALER);
    int linger = 0;
    zmq_setsockopt(l->sock, ZMQ_LINGER, &linger, sizeof linger);
    if (!strcmp(c->mechanism, "curve")) {
        if (zmq_setsockopt(l->sock, ZMQ_CURVE_SERVERKEY, c->server_public_key, 41)
            || zmq_setsockopt(l->sock, ZMQ_CURVE_PUBLICKEY, c->public_key, 41)
            || zmq_setsockopt(l->sock, ZMQ_CURVE_SECRETKEY, c->secret_key, 41)) {
            say("the CURVE keys cannot be used: %s", zmq_strerror(zmq_errno()));
            return -1;
        }
    } else if (!strcmp(c->mechanism, "plain")) {
        zmq_setsockopt(l->sock, ZMQ_PLAIN_USERNAME, c->id, strlen(c->id));
        zmq_setsockopt(l->sock, ZMQ_PLAIN_PASSWORD, c->password, strlen(c->password));
    }
    /* Watch the handshake until it succeeds: a refused credential ends the process with a reason. */
    char addr[64];
    snprintf(addr, sizeof addr, "inproc://handshake-%d", l->connections++);
    zmq_socket_monitor(l->sock, addr, ZMQ_EVENT_HANDSHAKE_SUCCEEDED | ZMQ_EVENT_HANDSHAKE_FAILED_AUTH
                                          | ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL | ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL);
    l->mon = zmq_socket(l->ctx, ZMQ_PAIR);
    zmq_connect(l->mon, addr);
    if (zmq_connect(l->sock, l->frontend)) {
        say("cannot connect to %s: %s", l->frontend, zmq_strerror(zmq_errno()));
        return -1;
    }
    send_hello(l->sock, c, l->mdl);  /* queued until the handshake is done */
    l->last_heard = now_ms();
    l->next_beat = l->last_heard + l->interval_ms;
    return 0;
}

/* A handshake event; an exit code when the frontend refused us, else -1. */
static int on_monitor_event(link_t *l) {
    zmq_msg_t ev, where;
    zmq_msg_init(&ev);
    zmq_msg_init(&where);
    if (zmq_msg_recv(&ev, l->mon, ZMQ_DONTWAIT) < 0) { zmq_msg_close(&ev); zmq_msg_close(&where); return -1; }
    zmq_msg_recv(&where, l->mon, 0);
    uint16_t event = 0;
    uint32_t value = 0;
    if (zmq_msg_size(&ev) >= 6) {
        memcpy(&event, zmq_msg_data(&ev), 2);
        memcpy(&value, (char *)zmq_msg_data(&ev) + 2, 4);
    }
    zmq_msg_close(&ev);
    zmq_msg_close(&where);
    if (event == ZMQ_EVENT_HANDSHAKE_SUCCEEDED) {
        if (g_verbose) say("handshake with %s succeeded", l->frontend);
        zmq_socket_monitor(l->sock, NULL, 0);
        zmq_close(l->mon);
        l->mon = NULL;
        l->handshake_failures = 0;
        return -1;
    }
    if (event == ZMQ_EVENT_HANDSHAKE_FAILED_AUTH) {
        say("the frontend at %s refused this container's credentials (revoked, or never issued by it; "
            "ZAP status %u)", l->frontend, value);
        return EXIT_REJECTED;
    }
    if (event == ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL) {
        say("the frontend at %s does not speak the security mechanism of these credentials (%s)", l->frontend,
            l->creds->mechanism);
        return EXIT_REJECTED;
    }
    if (++l->handshake_failures >= MAX_HANDSHAKE_FAILURES) {
        say("the handshake with %s failed %d times: its key is not the one these credentials name",
            l->frontend, l->handshake_failures);
        return EXIT_REJECTED;
    }
    return -1;  /* ZeroMQ tries again by itself */
}

/* One message from the frontend; an exit code when it ends the container, else -1. */
static int on_message(link_t *l, zmq_msg_t *parts, int nparts) {
    msgpack_unpacked und;
    msgpack_unpacked_init(&und);
    size_t off = 0;
    int rc = -1;
    if (msgpack_unpack_next(&und, zmq_msg_data(&parts[0]), zmq_msg_size(&parts[0]), &off) != MSGPACK_UNPACK_SUCCESS
        || und.data.type != MSGPACK_OBJECT_ARRAY || und.data.via.array.size < 1
        || !is_uint(&und.data.via.array.ptr[0])) {
        say("a message that is not a header: ignored");
        goto out;
    }
    l->last_heard = now_ms();
    const msgpack_object_array *h = &und.data.via.array;
    switch (h->ptr[0].via.u64) {
    case F_WELCOME:
        if (h->size == 3 && h->ptr[2].type == MSGPACK_OBJECT_MAP) {
            const msgpack_object_map *opts = &h->ptr[2].via.map;
            for (uint32_t i = 0; i < opts->size; i++) {
                const msgpack_object *v = &opts->ptr[i].val;
                if (!is_uint(v) || v->via.u64 < 1 || v->via.u64 > 3600000) continue;
                if (is_str(&opts->ptr[i].key, "heartbeat_interval_ms")) l->interval_ms = (int)v->via.u64;
                if (is_str(&opts->ptr[i].key, "heartbeat_timeout_ms")) l->timeout_ms = (int)v->via.u64;
            }
        }
        if (l->next_beat > l->last_heard + l->interval_ms) l->next_beat = l->last_heard + l->interval_ms;
        say("welcomed by %s as replica %llu (heartbeats every %d ms, timeout %d ms)", l->frontend,
            h->size > 1 && is_uint(&h->ptr[1]) ? (unsigned long long)h->ptr[1].via.u64 : 0ULL,
            l->interval_ms, l->timeout_ms);
        break;
    case F_BATCH:
        on_batch(l->sock, h, nparts > 1 ? &parts[1] : NULL, l->mdl);
        l->last_heard = now_ms();  /* a batch counts from its end */
        break;
    case F_HEARTBEAT:
        if (g_verbose) say("heartbeat from the frontend");
        break;
    case F_REJECT: {
        const msgpack_object *why = h->size > 1 ? &h->ptr[1] : NULL;
        if (why && why->type == MSGPACK_OBJECT_STR)
            say("frontend %s rejected it: %.*s", l->frontend, (int)why->via.str.size, why->via.str.ptr);
        else
            say("frontend %s rejected it", l->frontend);
        rc = EXIT_REJECTED;
        break;
    }
    case F_REHELLO:
        say("the frontend at %s does not know this connection: hello again", l->frontend);
        send_hello(l->sock, l->creds, l->mdl);
        break;
    default:
        break;  /* a later version's message: ignored */
    }
out:
    msgpack_unpacked_destroy(&und);
    return rc;
}

static int serve(link_t *l, int beat) {
    for (;;) {
        if (g_stop) return EXIT_OK;
        int64_t now = now_ms();
        long wait = (long)(l->next_beat - now);
        if (wait < 0) wait = 0;
        zmq_pollitem_t items[2] = {{l->sock, 0, ZMQ_POLLIN, 0}, {l->mon, 0, ZMQ_POLLIN, 0}};
        int n = zmq_poll(items, l->mon ? 2 : 1, wait + 1);
        if (n < 0 && zmq_errno() != EINTR) { say("poll failed: %s", zmq_strerror(zmq_errno())); return EXIT_REJECTED; }
        if (g_stop) return EXIT_OK;
        if (n > 0 && l->mon && (items[1].revents & ZMQ_POLLIN)) {
            int rc = on_monitor_event(l);
            if (rc >= 0) return rc;
        }
        if (n > 0 && (items[0].revents & ZMQ_POLLIN)) {
            for (;;) {  /* drain every whole message waiting */
                zmq_msg_t parts[3];
                int nparts = 0, more = 1, got = 0;
                while (more) {
                    zmq_msg_t part;
                    zmq_msg_init(&part);
                    if (zmq_msg_recv(&part, l->sock, nparts ? 0 : ZMQ_DONTWAIT) < 0) { zmq_msg_close(&part); break; }
                    got = 1;
                    more = zmq_msg_more(&part);
                    if (nparts < 3) parts[nparts++] = part;
                    else zmq_msg_close(&part);  /* frames past the payload: none defined */
                }
                if (!got) break;
                int rc = on_message(l, parts, nparts);
                for (int i = 0; i < nparts; i++) zmq_msg_close(&parts[i]);
                if (rc >= 0) return rc;
            }
        }
        now = now_ms();
        if (now >= l->next_beat) {
            if (beat) send_header_only(l->sock, C_HEARTBEAT);
            l->next_beat = now + l->interval_ms;
        }
        if (now - l->last_heard > l->timeout_ms) {
            say("the frontend at %s was silent for %lld ms: reconnecting", l->frontend,
                (long long)(now - l->last_heard));
            close_link(l, 0);
            if (open_link(l)) return EXIT_REJECTED;
        }
    }
}

static void usage(void) {
    fprintf(stderr, "usage: container [--credentials FILE] --weights FILE [--name MODEL] [--version V] "
                    "[--frontend ADDR] [--verbose] [--no-heartbeat]\n");
}

int main(int argc, char **argv) {
    const char *creds_path = NULL, *weights = NULL, *name = NULL, *version = NULL, *frontend = NULL;
    int beat = 1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char **dst = !strcmp(a, "--credentials") ? &creds_path : !strcmp(a, "--weights") ? &weights
                         : !strcmp(a, "--name") ? &name : !strcmp(a, "--version") ? &version
                         : !strcmp(a, "--frontend") ? &frontend : NULL;
        if (dst && i + 1 < argc) *dst = argv[++i];
        else if (!strcmp(a, "--verbose")) g_verbose = 1;
        else if (!strcmp(a, "--no-heartbeat")) beat = 0;  /* for tests: a container that never beats */
        else { usage(); return EXIT_REJECTED; }
    }
    if (!weights) { usage(); return EXIT_REJECTED; }
    creds_t creds = {0};
    if (load_credentials(creds_path, &creds)) return EXIT_REJECTED;
    g_name = name ? name : creds.model;
    g_version = version ? version : creds.version ? creds.version : "1";
    if (strcmp(g_name, creds.model) || (creds.version && strcmp(g_version, creds.version))) {
        say("its credentials were issued for model %s%s%s", creds.model, creds.version ? ":" : "",
            creds.version ? creds.version : "");
        return EXIT_REJECTED;
    }
    model_t mdl;
    if (load_model(weights, &mdl)) return EXIT_LOAD_FAILED;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    link_t l = {0};
    l.ctx = zmq_ctx_new();
    char *env_frontend = getenv("CLIPPER_FRONTEND") ? strdup(getenv("CLIPPER_FRONTEND")) : NULL;
    if (env_frontend) env_frontend[strcspn(env_frontend, ",")] = 0;  /* this container serves one frontend */
    l.frontend = frontend ? frontend : creds.frontend ? creds.frontend
               : env_frontend && *env_frontend ? env_frontend : "tcp://127.0.0.1:7000";
    l.creds = &creds;
    l.mdl = &mdl;
    l.interval_ms = 1000;  /* until the welcome says otherwise */
    l.timeout_ms = 5000;
    int rc = open_link(&l) ? EXIT_REJECTED : serve(&l, beat);
    close_link(&l, rc == EXIT_OK);
    zmq_ctx_term(l.ctx);
    if (rc == EXIT_OK) say("stopped");
    return rc;
}
