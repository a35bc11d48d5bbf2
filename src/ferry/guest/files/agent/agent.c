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
 *
 * Sessions (protocol 2). SESSION_OPEN starts a command whose stdin, stdout and
 * stderr stay connected to the host: on a pty (/dev/ptmx; the child is a
 * session leader with the pty as its controlling terminal) or on pipes. The
 * loop polls the port and every session's descriptors together, so sessions
 * stream while the agent waits for requests. Both directions have a window
 * (credit): the agent stops reading a session's output once SESSION_WINDOW
 * bytes wait for the host's SESSION_ACK, and acknowledges stdin once written
 * to the command; so neither side buffers more than a window per session.
 * A one-shot EXEC or hook still runs to its end first (sessions pause).
 *
 * Environment (agent 1.2). Every command the agent starts (EXEC, hooks,
 * sessions) first gets the variables of ENV_FILE, which the host writes after
 * a resume (`ferry vm run -e`); it is reread at each start, like hooks.conf,
 * and lives in the guest's /run (tmpfs): it moves with the VM's RAM.
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
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define AGENT_VERSION "ferry-agent 1.2"
#define PROTOCOL_VERSION 2
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
#define MAX_SESSIONS 8
#define MAX_CHUNK_BYTES (64u * 1024)   /* data in one SESSION_INPUT/SESSION_OUTPUT */
#define SESSION_WINDOW (256u * 1024)   /* unacknowledged bytes per session and direction */
#define MAX_TERM_BYTES 64
#define ENV_FILE "/run/ferry/env"      /* the VM's environment (ferry vm run -e), NAME=VALUE lines */
#define MAX_ENV_BYTES (64u * 1024)

enum msg_type {
    T_HELLO_REQUEST = 1, T_PING = 2, T_EXEC = 3, T_BEFORE_SUSPEND = 4, T_AFTER_RESUME = 5,
    T_SESSION_OPEN = 6, T_SESSION_INPUT = 7, T_SESSION_EOF = 8, T_SESSION_RESIZE = 9,
    T_SESSION_SIGNAL = 10, T_SESSION_ACK = 11,
    T_HELLO = 128, T_PONG = 129, T_EXEC_RESULT = 130, T_HOOKS_RESULT = 131, T_ERROR = 132,
    T_SESSION_STARTED = 133, T_SESSION_OUTPUT = 134, T_SESSION_INPUT_ACK = 135,
    T_SESSION_EXIT = 136,
};
enum outcome { O_EXITED = 0, O_SIGNALED = 1, O_TIMED_OUT = 2, O_START_FAILED = 3 };
enum err_code {
    E_MALFORMED = 1, E_UNKNOWN_TYPE = 2, E_TOO_LARGE = 3, E_INTERNAL = 4, E_CLOCK = 5,
    E_NO_SESSION = 6, E_BUSY = 7,
};

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

/* In a child before exec: the VM's environment (ENV_FILE), one NAME=VALUE per line.
 * Lines without a valid name are skipped; the host validated them already. */
static void load_env(void) {
    int fd = open(ENV_FILE, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return;
    static char data[MAX_ENV_BYTES + 1];
    size_t n = 0;
    for (;;) {
        ssize_t got = read(fd, data + n, MAX_ENV_BYTES - n);
        if (got <= 0) break;
        n += (size_t)got;
        if (n == MAX_ENV_BYTES) break;
    }
    close(fd);
    data[n] = 0;
    char *line = data;
    while (line < data + n) {
        char *end = memchr(line, '\n', (size_t)(data + n - line));
        if (end) *end = 0;
        char *eq = strchr(line, '=');
        int ok = eq && eq > line && !(line[0] >= '0' && line[0] <= '9');
        for (char *c = line; ok && c < eq; c++)
            ok = (*c >= 'A' && *c <= 'Z') || (*c >= 'a' && *c <= 'z') ||
                 (*c >= '0' && *c <= '9') || *c == '_';
        if (ok) {
            *eq = 0;
            setenv(line, eq + 1, 1);
        }
        if (!end) break;
        line = end + 1;
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
        load_env();
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

/* ---- sessions (protocol 2) -------------------------------------------------- */

struct session {
    uint32_t id;           /* the SESSION_OPEN's request id; 0: a free slot */
    pid_t pid;
    int tty;               /* stdin/stdout/stderr on one pty (in_fd is a dup of out_fd) */
    int in_fd, out_fd, err_fd;
    struct buf in;         /* stdin from the host not yet written to the command */
    size_t in_off;
    int in_eof;            /* 1: the host sent SESSION_EOF; 2: handled */
    uint32_t out_unacked;  /* output sent to the host and not yet acknowledged */
    int exited, status;
    int64_t last_out_ms;   /* after the exit: output open this long without bytes ends it */
};

static struct session sessions[MAX_SESSIONS];

static struct session *find_session(uint32_t id) {
    for (int i = 0; id && i < MAX_SESSIONS; i++)
        if (sessions[i].id == id) return &sessions[i];
    return NULL;
}

static int active_sessions(void) {
    int n = 0;
    for (int i = 0; i < MAX_SESSIONS; i++) n += sessions[i].id != 0;
    return n;
}

static void close_fd(int *fd) {
    if (*fd >= 0) close(*fd);
    *fd = -1;
}

static void session_release(struct session *s) {
    close_fd(&s->in_fd);
    close_fd(&s->out_fd);
    close_fd(&s->err_fd);
    buf_free(&s->in);
    memset(s, 0, sizeof *s);
    s->in_fd = s->out_fd = s->err_fd = -1;
}

static void send_u32(uint8_t type, uint32_t rid, uint32_t v) {
    struct buf p = {0};
    put_u32(&p, v);
    send_frame(type, rid, &p);
    buf_free(&p);
}

static void send_session_exit(uint32_t rid, int outcome, int code) {
    struct buf p = {0};
    put_u8(&p, (uint8_t)outcome);
    put_u32(&p, (uint32_t)code);
    send_frame(T_SESSION_EXIT, rid, &p);
    buf_free(&p);
}

/* The host is gone (or a new one said hello): nobody will read these sessions again. */
static void kill_sessions(void) {
    for (int i = 0; i < MAX_SESSIONS; i++) {
        struct session *s = &sessions[i];
        if (!s->id) continue;
        logf_("session %u: host gone; killing pid %d", s->id, (int)s->pid);
        kill(-s->pid, SIGKILL);
        kill(s->pid, SIGKILL);
        if (!s->exited) while (waitpid(s->pid, &s->status, 0) < 0 && errno == EINTR) {}
        session_release(s);
    }
}

/* Read one chunk of output (within the window) and send it; closes fd at EOF (EIO: pty). */
static void session_pump_out(struct session *s, int *fd, uint8_t stream) {
    static uint8_t chunk[MAX_CHUNK_BYTES];
    size_t room = SESSION_WINDOW - s->out_unacked;
    if (*fd < 0 || room == 0) return;
    ssize_t n = read(*fd, chunk, room < sizeof chunk ? room : sizeof chunk);
    if (n > 0) {
        struct buf p = {0};
        put_u8(&p, stream);
        put_blob(&p, chunk, (size_t)n);
        send_frame(T_SESSION_OUTPUT, s->id, &p);
        buf_free(&p);
        s->out_unacked += (uint32_t)n;
        s->last_out_ms = mono_ms();
    } else if (n == 0 || (errno != EAGAIN && errno != EINTR)) {
        close_fd(fd);
    }
}

/* Write pending stdin to the command, acknowledging what it took; then EOF if asked. */
static void session_pump_in(struct session *s) {
    size_t pending = s->in.len - s->in_off;
    if (pending && s->in_fd >= 0) {
        ssize_t w = write(s->in_fd, s->in.data + s->in_off, pending);
        if (w > 0) {
            s->in_off += (size_t)w;
            send_u32(T_SESSION_INPUT_ACK, s->id, (uint32_t)w);
        } else if (w < 0 && errno != EAGAIN && errno != EINTR) {
            close_fd(&s->in_fd);  /* the command closed its stdin */
        }
    }
    if (pending && s->in_fd < 0) {  /* nobody reads it any more: discard, but acknowledge */
        send_u32(T_SESSION_INPUT_ACK, s->id, (uint32_t)(s->in.len - s->in_off));
        s->in_off = s->in.len;
    }
    if (s->in_off == s->in.len) s->in.len = s->in_off = 0;
    if (s->in_eof == 1 && s->in.len == 0) {
        s->in_eof = 2;
        if (!s->tty) {
            close_fd(&s->in_fd);
        } else if (s->in_fd >= 0) {  /* a terminal has no half-close: type its EOF character */
            struct termios t;
            uint8_t eof = 4;
            if (tcgetattr(s->in_fd, &t) == 0) eof = t.c_cc[VEOF];
            ssize_t ignored = write(s->in_fd, &eof, 1);
            (void)ignored;
        }
    }
}

/* The child's exit is known and its output closed (or quiet for EXIT_GRACE_MS): report it. */
static void session_check_end(struct session *s) {
    if (!s->exited && waitpid(s->pid, &s->status, WNOHANG) == s->pid) {
        s->exited = 1;
        s->last_out_ms = mono_ms();
    }
    if (!s->exited) return;
    int quiet = mono_ms() - s->last_out_ms >= EXIT_GRACE_MS && s->out_unacked < SESSION_WINDOW;
    if ((s->out_fd >= 0 || s->err_fd >= 0) && !quiet) return;
    if (WIFEXITED(s->status)) send_session_exit(s->id, O_EXITED, WEXITSTATUS(s->status));
    else send_session_exit(s->id, O_SIGNALED, WTERMSIG(s->status));
    logf_("session %u ended", s->id);
    session_release(s);
}

static int open_pty(int *master, char *slave, size_t size, unsigned rows, unsigned cols) {
    *master = open("/dev/ptmx", O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (*master < 0) return -1;
    int unlock = 0;
    unsigned n;
    if (ioctl(*master, TIOCSPTLCK, &unlock) < 0 || ioctl(*master, TIOCGPTN, &n) < 0) return -1;
    snprintf(slave, size, "/dev/pts/%u", n);
    struct winsize ws = {(unsigned short)rows, (unsigned short)cols, 0, 0};
    if (rows && cols && ioctl(*master, TIOCSWINSZ, &ws) < 0) return -1;
    return 0;
}

/* Start argv in s (on a pty if s->tty); 0, or an errno with nothing left open. */
static int session_start(struct session *s, char *const argv[], const char *term,
                         unsigned rows, unsigned cols) {
    int master = -1, pin[2] = {-1, -1}, pout[2] = {-1, -1}, perr[2] = {-1, -1};
    int pexec[2] = {-1, -1}, err = 0;
    char slave[64] = "";
    if (s->tty ? open_pty(&master, slave, sizeof slave, rows, cols) < 0
               : (pipe2(pin, O_CLOEXEC) || pipe2(pout, O_CLOEXEC) || pipe2(perr, O_CLOEXEC)))
        err = errno;
    if (!err && pipe2(pexec, O_CLOEXEC)) err = errno;
    pid_t pid = err ? -1 : fork();
    if (pid == 0) {
        setsid();
        signal(SIGPIPE, SIG_DFL);
        int ok = 1;
        if (s->tty) {
            int fd = open(slave, O_RDWR);  /* a session leader's first tty: its controlling one */
            ok = fd >= 0 && ioctl(fd, TIOCSCTTY, 0) == 0;
            if (ok) {
                dup2(fd, 0); dup2(fd, 1); dup2(fd, 2);
                if (fd > 2) close(fd);
            }
        } else {
            dup2(pin[0], 0); dup2(pout[1], 1); dup2(perr[1], 2);
        }
        if (ok) {
            load_env();
            if (term[0]) setenv("TERM", term, 1);
            execvp(argv[0], argv);
        }
        int e = errno;
        ssize_t ignored = write(pexec[1], &e, sizeof e);
        (void)ignored;
        _exit(127);
    }
    if (!err && pid < 0) err = errno;
    close_fd(&pin[0]); close_fd(&pout[1]); close_fd(&perr[1]); close_fd(&pexec[1]);
    if (pid > 0) {
        int exec_errno = 0;
        ssize_t got;
        while ((got = read(pexec[0], &exec_errno, sizeof exec_errno)) < 0 && errno == EINTR) {}
        if (got > 0) {
            err = exec_errno ? exec_errno : EIO;
            while (waitpid(pid, NULL, 0) < 0 && errno == EINTR) {}
        }
    }
    close_fd(&pexec[0]);
    if (err) {
        close_fd(&master); close_fd(&pin[1]); close_fd(&pout[0]); close_fd(&perr[0]);
        return err;
    }
    s->pid = pid;
    if (s->tty) {
        s->out_fd = master;
        s->in_fd = fcntl(master, F_DUPFD_CLOEXEC, 3);
    } else {
        s->in_fd = pin[1];
        s->out_fd = pout[0];
        s->err_fd = perr[0];
    }
    if (s->in_fd >= 0) set_nonblock(s->in_fd);
    set_nonblock(s->out_fd);
    if (s->err_fd >= 0) set_nonblock(s->err_fd);
    return 0;
}

static void handle_session_open(uint32_t rid, struct rd *rd) {
    uint32_t flags = get_u8(rd), rows = get_u16(rd), cols = get_u16(rd);
    size_t tlen;
    const uint8_t *t = get_blob(rd, MAX_TERM_BYTES, &tlen);
    uint32_t argc = get_u16(rd);
    if (rd->bad || (flags & ~3u) || argc == 0 || argc > MAX_ARGS || !rid ||
        (tlen && memchr(t, 0, tlen))) {
        send_error(rid, E_MALFORMED, "bad SESSION_OPEN header");
        return;
    }
    char term[MAX_TERM_BYTES + 1] = "";
    if (tlen) memcpy(term, t, tlen);
    char **argv = calloc(argc + 1, sizeof *argv);
    int ok = argv != NULL;
    for (uint32_t i = 0; ok && i < argc; i++) {
        size_t n;
        const uint8_t *a = get_blob(rd, MAX_FRAME_BYTES, &n);
        if (!a || memchr(a, 0, n)) { ok = 0; break; }
        argv[i] = strndup((const char *)a, n);
    }
    struct session *s = NULL;
    for (int i = 0; ok && !s && i < MAX_SESSIONS; i++) if (!sessions[i].id) s = &sessions[i];
    if (!ok || rd->bad || rd->left) {
        send_error(rid, E_MALFORMED, "bad SESSION_OPEN arguments");
    } else if (find_session(rid)) {
        send_error(rid, E_MALFORMED, "session %u is already open", rid);
    } else if (!s) {
        send_error(rid, E_BUSY, "%d sessions are open already", MAX_SESSIONS);
    } else {
        char *shell[] = {"/bin/sh", "-c", argv[0], NULL};
        session_release(s);
        s->tty = (flags & 2) != 0;
        int err = session_start(s, flags & 1 ? shell : argv, term, rows, cols);
        if (err) {
            logf_("session %u: cannot start %s: %s", rid, argv[0], strerror(err));
            session_release(s);
            send_session_exit(rid, O_START_FAILED, err);
        } else {
            s->id = rid;
            logf_("session %u: pid %d%s", rid, (int)s->pid, s->tty ? " on a pty" : "");
            send_u32(T_SESSION_STARTED, rid, (uint32_t)s->pid);
        }
    }
    if (argv) {
        for (uint32_t i = 0; i < argc; i++) free(argv[i]);
        free(argv);
    }
}

/* SESSION_INPUT, _EOF, _RESIZE, _SIGNAL, _ACK: a request on an open session. */
static void handle_session_request(uint8_t type, uint32_t rid, struct rd *rd) {
    size_t n = 0;
    const uint8_t *data = NULL;
    uint32_t a = 0, b = 0;
    switch (type) {
    case T_SESSION_INPUT: data = get_blob(rd, MAX_CHUNK_BYTES, &n); break;
    case T_SESSION_RESIZE: a = get_u16(rd); b = get_u16(rd); break;
    case T_SESSION_SIGNAL: a = get_u8(rd); break;
    case T_SESSION_ACK: a = get_u32(rd); break;
    default: break;  /* T_SESSION_EOF: empty */
    }
    if (rd->bad || rd->left || (type == T_SESSION_SIGNAL && (a == 0 || a > 64))) {
        send_error(rid, E_MALFORMED, "bad session request (type %u)", type);
        return;
    }
    struct session *s = find_session(rid);
    if (!s) {
        send_error(rid, E_NO_SESSION, "no open session %u", rid);
        return;
    }
    switch (type) {
    case T_SESSION_INPUT:
        if (s->in_eof) {
            send_error(rid, E_MALFORMED, "session %u: input after EOF", rid);
        } else if (s->in.len - s->in_off + n > SESSION_WINDOW) {
            send_error(rid, E_TOO_LARGE, "session %u: input beyond the %u-byte window",
                       rid, SESSION_WINDOW);
        } else {
            put(&s->in, data, n);
            session_pump_in(s);
        }
        break;
    case T_SESSION_EOF:
        if (!s->in_eof) s->in_eof = 1;
        session_pump_in(s);
        break;
    case T_SESSION_RESIZE:
        if (s->tty) {
            struct winsize ws = {(unsigned short)a, (unsigned short)b, 0, 0};
            int fd = s->in_fd >= 0 ? s->in_fd : s->out_fd;
            if (fd >= 0 && ioctl(fd, TIOCSWINSZ, &ws) < 0)
                logf_("session %u: TIOCSWINSZ: %s", rid, strerror(errno));
        }
        break;
    case T_SESSION_SIGNAL:
        if (!s->exited) kill(-s->pid, (int)a);
        break;
    case T_SESSION_ACK:
        s->out_unacked -= a < s->out_unacked ? a : s->out_unacked;
        break;
    }
}

static void handle(uint8_t type, uint32_t rid, const uint8_t *payload, size_t len) {
    struct rd rd = {payload, len, 0};
    struct buf p = {0};
    switch (type) {
    case T_HELLO_REQUEST:
        kill_sessions();  /* a host that (re)connects unseen starts a new conversation */
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
    case T_SESSION_OPEN:
        handle_session_open(rid, &rd);
        break;
    case T_SESSION_INPUT:
    case T_SESSION_EOF:
    case T_SESSION_RESIZE:
    case T_SESSION_SIGNAL:
    case T_SESSION_ACK:
        handle_session_request(type, rid, &rd);
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
    for (int i = 0; i < MAX_SESSIONS; i++)  /* no descriptors yet (not 0: that is stdin) */
        sessions[i].in_fd = sessions[i].out_fd = sessions[i].err_fd = -1;
    int connected = 0;
    int64_t last_rx = 0;
    for (;;) {
        if (port_fd < 0) {
            kill_sessions();
            port_fd = open_port();
            if (port_fd < 0) { sleep_ms(200); continue; }
            connected = 0;
            inlen = 0;
        }
        /* The port first, then each session's descriptors (output only within its window). */
        struct pollfd pf[1 + 3 * MAX_SESSIONS];
        struct { struct session *s; int *fd; uint8_t stream; } slot[1 + 3 * MAX_SESSIONS];
        nfds_t n = 0;
        pf[n++] = (struct pollfd){port_fd, POLLIN, 0};
        for (int i = 0; connected && i < MAX_SESSIONS; i++) {
            struct session *s = &sessions[i];
            if (!s->id) continue;
            int room = s->out_unacked < SESSION_WINDOW;
            if (room && s->out_fd >= 0) {
                slot[n] = (typeof(slot[0])){s, &s->out_fd, 1};
                pf[n++] = (struct pollfd){s->out_fd, POLLIN, 0};
            }
            if (room && s->err_fd >= 0) {
                slot[n] = (typeof(slot[0])){s, &s->err_fd, 2};
                pf[n++] = (struct pollfd){s->err_fd, POLLIN, 0};
            }
            if (s->in_fd >= 0 && s->in.len > s->in_off) {
                slot[n] = (typeof(slot[0])){s, &s->in_fd, 0};
                pf[n++] = (struct pollfd){s->in_fd, POLLOUT, 0};
            }
        }
        /* No SIGCHLD handler: with sessions open, look at their children this often. */
        int wait = active_sessions() ? 50 : connected ? 500 : HUP_SLEEP_MS;
        int r = poll(pf, n, wait);
        if (r < 0 && errno != EINTR) { logf_("poll: %s", strerror(errno)); sleep_ms(HUP_SLEEP_MS); }
        if (pf[0].revents & POLLNVAL) { port_fd = -1; continue; }
        if (pf[0].revents & POLLHUP) {
            /* No host: whatever is buffered belongs to a conversation that is over. */
            if (connected) logf_("host disconnected");
            connected = 0;
            kill_sessions();
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
        for (nfds_t i = 1; r > 0 && i < n; i++) {
            if (!pf[i].revents || !slot[i].s->id) continue;
            if (slot[i].stream) session_pump_out(slot[i].s, slot[i].fd, slot[i].stream);
            else session_pump_in(slot[i].s);
        }
        if (pf[0].revents & (POLLIN | POLLERR)) {
            ssize_t got = read(port_fd, inbuf + inlen, HEADER_BYTES + MAX_FRAME_BYTES - inlen);
            if (got > 0) {
                inlen += (size_t)got;
                last_rx = mono_ms();
                process_input();
            } else if (got < 0 && errno != EAGAIN && errno != EINTR) {
                logf_("read: %s; reopening the port", strerror(errno));
                close(port_fd);
                port_fd = -1;
                sleep_ms(200);
            }
        } else if (inlen > 0 && mono_ms() - last_rx > PARTIAL_IDLE_MS) {
            logf_("dropping %zu bytes of an incomplete frame", inlen);
            inlen = 0;
        }
        for (int i = 0; port_fd >= 0 && i < MAX_SESSIONS; i++)
            if (sessions[i].id) session_check_end(&sessions[i]);
    }
}
