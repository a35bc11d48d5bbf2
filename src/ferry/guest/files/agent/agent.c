/*
 * ferry guest agent: serves the host over the virtio-serial port "ferry.agent".
 *
 * Built at image-build time with `gcc -static -O2` (ferry.guest.image.agent) and
 * installed as /ferry/agent/agent; /ferry/start-agent runs it at boot. The
 * protocol (frames, messages, limits) is specified in docs/agent.md and
 * mirrored by the host codec in ferry/guest/agent/protocol.py: keep them in step.
 *
 * Theory of operation. One thread, one request at a time. The port is opened
 * non-blocking: while no host is connected, the virtio_console driver reports
 * POLLHUP and read() returns 0, and a blocking write() would sleep until a
 * host appears. So the loop polls the port; on POLLHUP it drops whatever it
 * buffered (an old conversation) and sleeps in short steps until the hang-up
 * clears, then announces itself with HELLO. That covers a host that closes
 * and reconnects, and a VM restored from a snapshot under a new QEMU whose
 * socket is new. A host that connects while the agent never saw the hang-up
 * (the VM was paused across it) sends HELLO_REQUEST. Every frame starts with
 * a magic, so bytes of an old conversation are skipped, never misread.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define AGENT_VERSION "ferry-agent 1.0"
#define PROTOCOL_VERSION 1
#define MAGIC "FAGT"
#define HEADER_BYTES 16
#define MAX_FRAME_BYTES (4u * 1024 * 1024)
#define MAX_OUTPUT_BYTES (1024u * 1024)
#define MAX_STDIN_BYTES (1024u * 1024)
#define MAX_ARGS 4096
#define MAX_HOOKS 64
#define HOOK_OUTPUT_BYTES (64u * 1024)
#define DEFAULT_PORT_NAME "ferry.agent"
#define HOOKS_FILE "/ferry/agent/hooks.conf"
#define HUP_SLEEP_MS 50        /* how often a disconnected agent looks for a host */
#define PARTIAL_IDLE_MS 2000   /* a frame half-received this long is garbage */
#define EXIT_GRACE_MS 200      /* output still open after the child exited (daemons) */

enum msg_type {
    T_HELLO_REQUEST = 1, T_PING = 2, T_EXEC = 3, T_BEFORE_SUSPEND = 4, T_AFTER_RESUME = 5,
    T_HELLO = 128, T_PONG = 129, T_EXEC_RESULT = 130, T_HOOKS_RESULT = 131, T_ERROR = 132,
};
enum outcome { O_EXITED = 0, O_SIGNALED = 1, O_TIMED_OUT = 2, O_START_FAILED = 3 };
enum err_code { E_MALFORMED = 1, E_UNKNOWN_TYPE = 2, E_TOO_LARGE = 3, E_INTERNAL = 4, E_CLOCK = 5 };

static const char *port_name = DEFAULT_PORT_NAME;
static int port_fd = -1;
static char boot_id[64] = "unknown";

static void logf_(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("ferry-agent: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

static int64_t clock_ns(clockid_t id) {
    struct timespec ts;
    clock_gettime(id, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int64_t mono_ms(void) { return clock_ns(CLOCK_MONOTONIC) / 1000000; }

static void sleep_ms(int ms) {
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {}
}

/* ---- growable byte buffer ------------------------------------------------ */

struct buf { uint8_t *data; size_t len, cap; };

static void buf_reserve(struct buf *b, size_t extra) {
    if (b->len + extra <= b->cap) return;
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + extra) cap *= 2;
    uint8_t *p = realloc(b->data, cap);
    if (!p) { logf_("out of memory"); abort(); }
    b->data = p;
    b->cap = cap;
}
static void put(struct buf *b, const void *p, size_t n) {
    buf_reserve(b, n);
    memcpy(b->data + b->len, p, n);
    b->len += n;
}
static void put_u8(struct buf *b, uint8_t v) { put(b, &v, 1); }
static void put_u16(struct buf *b, uint16_t v) { uint8_t x[2] = {v >> 8, v}; put(b, x, 2); }
static void put_u32(struct buf *b, uint32_t v) {
    uint8_t x[4] = {v >> 24, v >> 16, v >> 8, v};
    put(b, x, 4);
}
static void put_i64(struct buf *b, int64_t s) {
    uint64_t v = (uint64_t)s;
    put_u32(b, (uint32_t)(v >> 32));
    put_u32(b, (uint32_t)v);
}
static void put_blob(struct buf *b, const void *p, size_t n) { put_u32(b, (uint32_t)n); put(b, p, n); }
static void buf_free(struct buf *b) { free(b->data); b->data = NULL; b->len = b->cap = 0; }

/* ---- bounds-checked payload reader ---------------------------------------- */

struct rd { const uint8_t *p; size_t left; int bad; };

static const uint8_t *take(struct rd *r, size_t n) {
    if (r->bad || n > r->left) { r->bad = 1; return NULL; }
    const uint8_t *p = r->p;
    r->p += n;
    r->left -= n;
    return p;
}
static uint32_t get_u8(struct rd *r) { const uint8_t *p = take(r, 1); return p ? p[0] : 0; }
static uint32_t get_u16(struct rd *r) { const uint8_t *p = take(r, 2); return p ? (uint32_t)p[0] << 8 | p[1] : 0; }
static uint32_t get_u32(struct rd *r) {
    const uint8_t *p = take(r, 4);
    return p ? (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3] : 0;
}
static int64_t get_i64(struct rd *r) {
    uint64_t hi = get_u32(r), lo = get_u32(r);
    return (int64_t)(hi << 32 | lo);
}
static const uint8_t *get_blob(struct rd *r, size_t cap, size_t *n) {
    *n = get_u32(r);
    if (*n > cap) { r->bad = 1; return NULL; }
    return take(r, *n);
}

/* ---- the port -------------------------------------------------------------- */

/* The /dev node of the virtio port named port_name, created if devtmpfs lacks it. */
static int find_port(char *path, size_t size) {
    DIR *d = opendir("/sys/class/virtio-ports");
    if (!d) return -1;
    struct dirent *e;
    int found = -1;
    while (found < 0 && (e = readdir(d))) {
        if (e->d_name[0] == '.') continue;
        char file[512], name[256] = "";
        snprintf(file, sizeof file, "/sys/class/virtio-ports/%s/name", e->d_name);
        FILE *f = fopen(file, "re");
        if (!f) continue;
        if (fgets(name, sizeof name, f)) name[strcspn(name, "\n")] = 0;
        fclose(f);
        if (strcmp(name, port_name) != 0) continue;
        snprintf(path, size, "/dev/%s", e->d_name);
        found = 0;
        struct stat st;
        if (stat(path, &st) == 0) break;
        unsigned maj, min;
        snprintf(file, sizeof file, "/sys/class/virtio-ports/%s/dev", e->d_name);
        f = fopen(file, "re");
        if (f && fscanf(f, "%u:%u", &maj, &min) == 2) mknod(path, S_IFCHR | 0600, makedev(maj, min));
        if (f) fclose(f);
    }
    closedir(d);
    return found;
}

static int open_port(void) {
    static int warned;
    char path[300];
    if (find_port(path, sizeof path) < 0) {
        if (!warned++) logf_("no virtio port named %s yet; waiting", port_name);
        return -1;
    }
    int fd = open(path, O_RDWR | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
    if (fd < 0) {
        if (!warned++) logf_("open %s: %s", path, strerror(errno));
        return -1;
    }
    logf_("opened %s (%s)", path, port_name);
    return fd;
}

/* Write all of p; 0 on success, -1 if the host went away or the port broke. */
static int write_all(const uint8_t *p, size_t n) {
    while (n > 0) {
        ssize_t w = write(port_fd, p, n);
        if (w > 0) { p += w; n -= (size_t)w; continue; }
        if (w < 0 && errno == EINTR) continue;
        if (w < 0 && errno != EAGAIN) return -1;
        struct pollfd pf = {port_fd, POLLOUT, 0};
        if (poll(&pf, 1, 1000) < 0 && errno != EINTR) return -1;
        if (pf.revents & (POLLHUP | POLLERR | POLLNVAL)) return -1;
    }
    return 0;
}

static void send_frame(uint8_t type, uint32_t rid, const struct buf *payload) {
    struct buf f = {0};
    put(&f, MAGIC, 4);
    put_u8(&f, type);
    put_u8(&f, 0);
    put_u16(&f, 0);
    put_u32(&f, rid);
    put_u32(&f, (uint32_t)payload->len);
    put(&f, payload->data, payload->len);
    if (write_all(f.data, f.len) < 0) logf_("reply type %u dropped: host gone", type);
    buf_free(&f);
}

static void send_error(uint32_t rid, uint16_t code, const char *fmt, ...) {
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    struct buf p = {0};
    put_u16(&p, code);
    put_blob(&p, msg, strlen(msg));
    send_frame(T_ERROR, rid, &p);
    buf_free(&p);
}

static void send_hello(void) {
    struct buf p = {0};
    put_u16(&p, PROTOCOL_VERSION);
    put_blob(&p, AGENT_VERSION, strlen(AGENT_VERSION));
    put_blob(&p, boot_id, strlen(boot_id));
    send_frame(T_HELLO, 0, &p);
    buf_free(&p);
}

/* ---- running commands ------------------------------------------------------- */

struct result {
    int outcome, code;
    struct buf out, err;
    int out_trunc, err_trunc;
};

static void set_nonblock(int fd) { fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK); }

/* Read what is there from fd into b (up to cap, the rest counted as truncated); -1 at EOF. */
static int drain_into(int fd, struct buf *b, size_t cap, int *trunc) {
    uint8_t chunk[16384];
    for (;;) {
        ssize_t n = read(fd, chunk, sizeof chunk);
        if (n == 0) return -1;
        if (n < 0) return (errno == EAGAIN || errno == EINTR) ? 0 : -1;
        size_t keep = b->len < cap ? cap - b->len : 0;
        if ((size_t)n > keep) *trunc = 1;
        put(b, chunk, (size_t)n < keep ? (size_t)n : keep);
    }
}

/*
 * Run argv with stdin `in`, collecting stdout and stderr (merged into out when
 * `merge`), killing its process group at the deadline. The child is a session
 * leader so a timeout also kills what it started.
 */
static void run(char *const argv[], const uint8_t *in, size_t inlen, int64_t timeout_ms,
                size_t cap, int merge, struct result *r) {
    memset(r, 0, sizeof *r);
    int pin[2], pout[2], perr[2], pexec[2];
    if (pipe2(pin, O_CLOEXEC) || pipe2(pout, O_CLOEXEC) || pipe2(perr, O_CLOEXEC) ||
        pipe2(pexec, O_CLOEXEC)) {
        r->outcome = O_START_FAILED;
        r->code = errno;
        return;  /* a few descriptors may leak on EMFILE; the agent has thousands */
    }
    pid_t pid = fork();
    if (pid == 0) {
        setsid();
        signal(SIGPIPE, SIG_DFL);  /* SIG_IGN would survive exec */
        dup2(pin[0], 0);
        dup2(pout[1], 1);
        dup2(merge ? pout[1] : perr[1], 2);
        execvp(argv[0], argv);
        int e = errno;
        ssize_t ignored = write(pexec[1], &e, sizeof e);
        (void)ignored;
        _exit(127);
    }
    close(pin[0]);
    close(pout[1]);
    close(perr[1]);
    close(pexec[1]);
    if (pid < 0) {
        r->outcome = O_START_FAILED;
        r->code = errno;
        close(pin[1]); close(pout[0]); close(perr[0]); close(pexec[0]);
        return;
    }
    int exec_errno = 0;
    ssize_t got;
    while ((got = read(pexec[0], &exec_errno, sizeof exec_errno)) < 0 && errno == EINTR) {}
    close(pexec[0]);
    int fin = pin[1], fout = pout[0], ferr = perr[0];
    set_nonblock(fin);
    set_nonblock(fout);
    set_nonblock(ferr);
    size_t sent = 0;
    if (got > 0 || inlen == 0) { close(fin); fin = -1; }
    int64_t deadline = mono_ms() + timeout_ms, exited_at = -1;
    int status = 0, timed_out = 0;
    for (;;) {
        if (exited_at < 0 && waitpid(pid, &status, WNOHANG) == pid) exited_at = mono_ms();
        int64_t now = mono_ms();
        if (exited_at >= 0 && ((fout < 0 && ferr < 0) || now - exited_at >= EXIT_GRACE_MS)) break;
        if (exited_at < 0 && now >= deadline) {
            kill(-pid, SIGKILL);
            kill(pid, SIGKILL);
            while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {}
            timed_out = 1;
            if (fout >= 0) drain_into(fout, &r->out, cap, &r->out_trunc);
            if (ferr >= 0) drain_into(ferr, &r->err, cap, &r->err_trunc);
            break;
        }
        struct pollfd pf[3];
        int n = 0, iin = -1, iout = -1, ierr = -1;
        if (fin >= 0) { iin = n; pf[n++] = (struct pollfd){fin, POLLOUT, 0}; }
        if (fout >= 0) { iout = n; pf[n++] = (struct pollfd){fout, POLLIN, 0}; }
        if (ferr >= 0) { ierr = n; pf[n++] = (struct pollfd){ferr, POLLIN, 0}; }
        int64_t wait = deadline - now;
        if (wait > 50) wait = 50;  /* no SIGCHLD handler: look at the child this often */
        if (poll(pf, (nfds_t)n, (int)wait) < 0 && errno != EINTR) break;
        if (iin >= 0 && pf[iin].revents) {
            ssize_t w = write(fin, in + sent, inlen - sent);
            if (w > 0) sent += (size_t)w;
            if ((w < 0 && errno != EAGAIN && errno != EINTR) || sent == inlen) {
                close(fin);
                fin = -1;
            }
        }
        if (iout >= 0 && pf[iout].revents && drain_into(fout, &r->out, cap, &r->out_trunc) < 0) {
            close(fout);
            fout = -1;
        }
        if (ierr >= 0 && pf[ierr].revents && drain_into(ferr, &r->err, cap, &r->err_trunc) < 0) {
            close(ferr);
            ferr = -1;
        }
    }
    if (fin >= 0) close(fin);
    if (fout >= 0) close(fout);
    if (ferr >= 0) close(ferr);
    if (got > 0) { r->outcome = O_START_FAILED; r->code = exec_errno; }
    else if (timed_out) { r->outcome = O_TIMED_OUT; r->code = SIGKILL; }
    else if (WIFEXITED(status)) { r->outcome = O_EXITED; r->code = WEXITSTATUS(status); }
    else { r->outcome = O_SIGNALED; r->code = WTERMSIG(status); }
}

static void handle_exec(uint32_t rid, struct rd *rd) {
    uint32_t flags = get_u8(rd), timeout_ms = get_u32(rd), cap = get_u32(rd), argc = get_u16(rd);
    if (rd->bad || argc == 0 || argc > MAX_ARGS || (flags & ~1u) || timeout_ms == 0) {
        send_error(rid, E_MALFORMED, "bad EXEC header");
        return;
    }
    if (cap > MAX_OUTPUT_BYTES) cap = MAX_OUTPUT_BYTES;
    char **argv = calloc(argc + 3, sizeof *argv);
    int ok = argv != NULL;
    for (uint32_t i = 0; ok && i < argc; i++) {
        size_t n;
        const uint8_t *a = get_blob(rd, MAX_FRAME_BYTES, &n);
        if (!a || memchr(a, 0, n)) { ok = 0; break; }
        argv[i] = strndup((const char *)a, n);
    }
    size_t inlen = 0;
    const uint8_t *in = ok ? get_blob(rd, MAX_STDIN_BYTES, &inlen) : NULL;
    if (!ok || rd->bad || rd->left) {
        send_error(rid, E_MALFORMED, "bad EXEC arguments");
    } else {
        char *shell[] = {"/bin/sh", "-c", argv[0], NULL};
        struct result r;
        run(flags & 1 ? shell : argv, in, inlen, timeout_ms, cap, 0, &r);
        struct buf p = {0};
        put_u8(&p, (uint8_t)r.outcome);
        put_u32(&p, (uint32_t)r.code);
        put_u8(&p, (uint8_t)((r.out_trunc ? 1 : 0) | (r.err_trunc ? 2 : 0)));
        put_blob(&p, r.out.data, r.out.len);
        put_blob(&p, r.err.data, r.err.len);
        send_frame(T_EXEC_RESULT, rid, &p);
        buf_free(&p);
        buf_free(&r.out);
        buf_free(&r.err);
    }
    if (argv) {
        for (uint32_t i = 0; i < argc; i++) free(argv[i]);
        free(argv);
    }
}

/* ---- hooks ------------------------------------------------------------------ */

/*
 * Run every "<phase> <command>" line of HOOKS_FILE in order, each with what is
 * left of the request's deadline, appending results to p (count first).
 */
static void run_hooks(const char *phase, int64_t deadline, struct buf *p) {
    char *cmds[MAX_HOOKS];
    int count = 0;
    FILE *f = fopen(HOOKS_FILE, "re");
    char *line = NULL;
    size_t size = 0;
    size_t plen = strlen(phase);
    while (f && count < MAX_HOOKS && getline(&line, &size, f) >= 0) {
        line[strcspn(line, "\n")] = 0;
        if (strncmp(line, phase, plen) == 0 && line[plen] == ' ') cmds[count++] = strdup(line + plen + 1);
    }
    free(line);
    if (f) fclose(f);
    put_u16(p, (uint16_t)count);
    for (int i = 0; i < count; i++) {
        struct result r;
        int64_t left = deadline - mono_ms();
        put_blob(p, cmds[i], strlen(cmds[i]));
        if (left <= 0) {
            memset(&r, 0, sizeof r);
            r.outcome = O_TIMED_OUT;
        } else {
            char *argv[] = {"/bin/sh", "-c", cmds[i], NULL};
            run(argv, NULL, 0, left, HOOK_OUTPUT_BYTES, 1, &r);
        }
        logf_("%s hook '%s': outcome %d code %d", phase, cmds[i], r.outcome, r.code);
        put_u8(p, (uint8_t)r.outcome);
        put_u32(p, (uint32_t)r.code);
        put_blob(p, r.out.data, r.out.len);
        buf_free(&r.out);
        buf_free(&r.err);
        free(cmds[i]);
    }
}

static void handle_before_suspend(uint32_t rid, struct rd *rd) {
    uint32_t timeout_ms = get_u32(rd);
    if (rd->bad || rd->left || timeout_ms == 0) { send_error(rid, E_MALFORMED, "bad BEFORE_SUSPEND"); return; }
    int64_t deadline = mono_ms() + timeout_ms;
    struct buf p = {0};
    put_i64(&p, 0);
    run_hooks("before_suspend", deadline, &p);
    sync();  /* the disk image is copied while the guest is stopped: flush it first */
    send_frame(T_HOOKS_RESULT, rid, &p);
    buf_free(&p);
}

static void handle_after_resume(uint32_t rid, struct rd *rd) {
    uint32_t timeout_ms = get_u32(rd);
    int64_t host_ns = get_i64(rd);
    if (rd->bad || rd->left || timeout_ms == 0) { send_error(rid, E_MALFORMED, "bad AFTER_RESUME"); return; }
    int64_t deadline = mono_ms() + timeout_ms;
    int64_t before = clock_ns(CLOCK_REALTIME);
    struct timespec ts = {(time_t)(host_ns / 1000000000), (long)(host_ns % 1000000000)};
    if (ts.tv_nsec < 0) { ts.tv_sec -= 1; ts.tv_nsec += 1000000000; }
    if (clock_settime(CLOCK_REALTIME, &ts) < 0) {
        send_error(rid, E_CLOCK, "clock_settime: %s", strerror(errno));
        return;
    }
    logf_("clock set, offset %lld ms", (long long)((host_ns - before) / 1000000));
    struct buf p = {0};
    put_i64(&p, host_ns - before);
    run_hooks("after_resume", deadline, &p);
    send_frame(T_HOOKS_RESULT, rid, &p);
    buf_free(&p);
}

static void handle(uint8_t type, uint32_t rid, const uint8_t *payload, size_t len) {
    struct rd rd = {payload, len, 0};
    struct buf p = {0};
    switch (type) {
    case T_HELLO_REQUEST:
        send_hello();
        break;
    case T_PING:
        put_i64(&p, clock_ns(CLOCK_REALTIME));
        put_i64(&p, clock_ns(CLOCK_BOOTTIME));
        send_frame(T_PONG, rid, &p);
        break;
    case T_EXEC:
        handle_exec(rid, &rd);
        break;
    case T_BEFORE_SUSPEND:
        handle_before_suspend(rid, &rd);
        break;
    case T_AFTER_RESUME:
        handle_after_resume(rid, &rd);
        break;
    default:
        send_error(rid, E_UNKNOWN_TYPE, "unknown message type %u", type);
    }
    buf_free(&p);
}

/* ---- main loop -------------------------------------------------------------- */

static uint8_t *inbuf;
static size_t inlen;

/* Handle every complete frame in inbuf; skip bytes that cannot start one. */
static void process_input(void) {
    for (;;) {
        uint8_t *at = memmem(inbuf, inlen, MAGIC, 4);
        size_t skip = at ? (size_t)(at - inbuf) : (inlen > 3 ? inlen - 3 : 0);
        if (skip) {
            logf_("skipped %zu bytes of garbage", skip);
            memmove(inbuf, inbuf + skip, inlen - skip);
            inlen -= skip;
        }
        if (!at || inlen < HEADER_BYTES) return;
        uint8_t type = inbuf[4];
        uint32_t rid = (uint32_t)inbuf[8] << 24 | (uint32_t)inbuf[9] << 16 | (uint32_t)inbuf[10] << 8 | inbuf[11];
        uint32_t len = (uint32_t)inbuf[12] << 24 | (uint32_t)inbuf[13] << 16 | (uint32_t)inbuf[14] << 8 | inbuf[15];
        if (len > MAX_FRAME_BYTES || inbuf[5] || inbuf[6] || inbuf[7]) {
            if (len > MAX_FRAME_BYTES) send_error(rid, E_TOO_LARGE, "frame of %u bytes exceeds %u", len, MAX_FRAME_BYTES);
            else send_error(rid, E_MALFORMED, "non-zero flags or reserved bits");
            memmove(inbuf, inbuf + 1, --inlen);  /* resynchronise on the next magic */
            continue;
        }
        if (inlen < HEADER_BYTES + (size_t)len) return;
        handle(type, rid, inbuf + HEADER_BYTES, len);
        size_t used = HEADER_BYTES + (size_t)len;
        memmove(inbuf, inbuf + used, inlen - used);
        inlen -= used;
    }
}

static void read_boot_id(void) {
    FILE *f = fopen("/proc/sys/kernel/random/boot_id", "re");
    if (f) {
        if (fgets(boot_id, sizeof boot_id, f)) boot_id[strcspn(boot_id, "\n")] = 0;
        fclose(f);
    }
}

int main(int argc, char **argv) {
    if (argc > 1) port_name = argv[1];
    signal(SIGPIPE, SIG_IGN);
    setenv("PATH", "/usr/sbin:/usr/bin:/sbin:/bin", 1);
    setenv("HOME", "/root", 1);
    if (chdir("/") < 0) logf_("chdir /: %s", strerror(errno));
    read_boot_id();
    inbuf = malloc(HEADER_BYTES + MAX_FRAME_BYTES);
    if (!inbuf) { logf_("out of memory"); return 1; }
    int connected = 0;
    int64_t last_rx = 0;
    for (;;) {
        if (port_fd < 0) {
            port_fd = open_port();
            if (port_fd < 0) { sleep_ms(200); continue; }
            connected = 0;
            inlen = 0;
        }
        struct pollfd pf = {port_fd, POLLIN, 0};
        int r = poll(&pf, 1, connected ? 500 : HUP_SLEEP_MS);
        if (r < 0 && errno != EINTR) { logf_("poll: %s", strerror(errno)); sleep_ms(HUP_SLEEP_MS); }
        if (pf.revents & POLLNVAL) { port_fd = -1; continue; }
        if (pf.revents & POLLHUP) {
            /* No host: whatever is buffered belongs to a conversation that is over. */
            if (connected) logf_("host disconnected");
            connected = 0;
            uint8_t scratch[4096];
            while (read(port_fd, scratch, sizeof scratch) > 0) {}
            inlen = 0;
            sleep_ms(HUP_SLEEP_MS);
            continue;
        }
        if (!connected) {
            connected = 1;
            logf_("host connected; sending hello");
            send_hello();
        }
        if (pf.revents & (POLLIN | POLLERR)) {
            ssize_t n = read(port_fd, inbuf + inlen, HEADER_BYTES + MAX_FRAME_BYTES - inlen);
            if (n > 0) {
                inlen += (size_t)n;
                last_rx = mono_ms();
                process_input();
            } else if (n < 0 && errno != EAGAIN && errno != EINTR) {
                logf_("read: %s; reopening the port", strerror(errno));
                close(port_fd);
                port_fd = -1;
                sleep_ms(200);
            }
        } else if (inlen > 0 && mono_ms() - last_rx > PARTIAL_IDLE_MS) {
            logf_("dropping %zu bytes of an incomplete frame", inlen);
            inlen = 0;
        }
    }
}
