/* metald guest agent: serves the virtio-serial port org.metald.agent (docs/agent.md).
 *
 * Two protocols share the port; the first byte of each message tells which:
 *  - 0xF5: a binary frame, protocol version 1:
 *      magic u8 | version u8 | type u8 | flags u8 | request id u32 BE | payload length u32 BE |
 *      payload = fields, each tag u8 | length u32 BE | bytes (integers: 8 bytes BE).
 *    Several requests run at once; every answer carries the request's id.
 *  - anything else: the version 0 line protocol (ping TOK, reboot, poweroff, exec CMD).
 *
 * One thread, one poll() loop. The agent blocks: while no host is connected to the port, poll()
 * would report POLLHUP at once, so the port leaves the poll set and the agent waits for the SIGIO
 * the kernel sends when the host side opens (O_ASYNC); SIGCHLD and SIGIO arrive on a signalfd.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/random.h>
#include <linux/rtnetlink.h>
#include <net/if.h>
#include <net/if_arp.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PORT_NAME "org.metald.agent"
#define AGENT_VERSION "3" /* 2: REFRESH; 3: REFRESH sets NICs (F_NIC), its OK carries F_VERSION */
#define MAGIC 0xF5
#define PROTO_VERSION 1
#define HDR 12
#define MAX_PAYLOAD (17u << 20) /* 16 MiB of data plus room for the other fields */
#define MAX_DATA (16u << 20)    /* per output stream, per file */
#define MAX_LINE 65536
#define CHUNK 65536
#define MAX_JOBS 64
#define MAX_ARGS 4096

enum { T_PING = 2, T_PONG = 3, T_OK = 4, T_ERROR = 5,
       T_EXEC = 16, T_OUTPUT = 17, T_EXIT = 18, T_KILL = 19,
       T_WRITE = 32, T_READ = 33, T_FILE = 34,
       T_CLOCK = 48, T_ENTROPY = 49, T_POWER = 50, T_REFRESH = 51 };
enum { F_ARG = 1, F_ENV = 2, F_CWD = 3, F_STDIN = 4, F_TIMEOUT_MS = 5, F_PATH = 6, F_MODE = 7,
       F_DATA = 8, F_CODE = 9, F_MESSAGE = 10, F_STREAM = 11, F_TIMED_OUT = 12, F_TRUNCATED = 13,
       F_SIZE = 14, F_TIME_NS = 15, F_BOOT_ID = 16, F_VERSION = 17, F_ACTION = 18, F_SIGNAL = 19,
       F_UPTIME_MS = 20, F_HOSTNAME = 21, F_VM_ID = 22, F_NIC = 23 };

struct field { const unsigned char *p; uint32_t len; };

struct job {
    int used, line_mode, timed_out, truncated, exited, status;
    uint32_t id;
    pid_t pid;
    int fd[2];                 /* stdout, stderr (line mode: both on fd[0]) */
    int in_fd;
    unsigned char *in_buf;
    size_t in_len, in_off;
    uint64_t sent[2];
    long long deadline_ms;     /* 0: none */
    unsigned char *text;       /* line mode: the collected output */
    size_t text_len;
};

static int port = -1, host_up;
static unsigned char *inbuf;
static size_t in_len, in_cap;
static struct job jobs[MAX_JOBS];

/* ---- output ---------------------------------------------------------------------------- */

struct out { unsigned char *p; size_t len, cap; };

static void out_put(struct out *o, const void *data, size_t n) {
    if (o->len + n > o->cap) {
        size_t cap = o->cap ? o->cap : 256;
        while (cap < o->len + n) cap *= 2;
        unsigned char *p = realloc(o->p, cap);
        if (!p) abort();
        o->p = p;
        o->cap = cap;
    }
    memcpy(o->p + o->len, data, n);
    o->len += n;
}

static void put_u32(unsigned char *p, uint32_t v) {
    p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = v;
}

static uint32_t get_u32(const unsigned char *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static void frame_start(struct out *o, int type, uint32_t id) {
    unsigned char h[HDR] = {MAGIC, PROTO_VERSION, (unsigned char)type, 0};
    put_u32(h + 4, id);
    o->len = 0;
    out_put(o, h, HDR);
}

static void field_bytes(struct out *o, int tag, const void *data, size_t n) {
    unsigned char h[5] = {(unsigned char)tag};
    put_u32(h + 1, (uint32_t)n);
    out_put(o, h, 5);
    out_put(o, data, n);
}

static void field_str(struct out *o, int tag, const char *s) { field_bytes(o, tag, s, strlen(s)); }

static void field_int(struct out *o, int tag, int64_t v) {
    unsigned char b[8];
    for (int i = 0; i < 8; i++) b[i] = (uint64_t)v >> (56 - 8 * i);
    field_bytes(o, tag, b, 8);
}

static void write_port(const void *data, size_t n) {
    const unsigned char *p = data;
    while (n > 0 && host_up) {
        ssize_t w = write(port, p, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return; /* the host went away: the answer is lost with its connection */
        p += w;
        n -= (size_t)w;
    }
}

static void frame_send(struct out *o) {
    put_u32(o->p + 8, (uint32_t)(o->len - HDR));
    write_port(o->p, o->len);
}

static void send_simple(int type, uint32_t id) {
    struct out o = {0};
    frame_start(&o, type, id);
    frame_send(&o);
    free(o.p);
}

static void send_error(uint32_t id, int code, const char *what, const char *detail) {
    char msg[PATH_MAX + 256];
    snprintf(msg, sizeof msg, "%s%s%s", what, detail ? ": " : "", detail ? detail : "");
    struct out o = {0};
    frame_start(&o, T_ERROR, id);
    field_int(&o, F_CODE, code);
    field_str(&o, F_MESSAGE, msg);
    frame_send(&o);
    free(o.p);
}

static long long now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void boot_id(char *buf, size_t n) {
    buf[0] = 0;
    int fd = open("/proc/sys/kernel/random/boot_id", O_RDONLY | O_CLOEXEC);
    if (fd < 0) return;
    ssize_t r = read(fd, buf, n - 1);
    close(fd);
    buf[r > 0 ? r : 0] = 0;
    buf[strcspn(buf, "\n")] = 0;
}

static void send_pong(uint32_t id) {
    char bid[64];
    boot_id(bid, sizeof bid);
    struct out o = {0};
    frame_start(&o, T_PONG, id);
    field_str(&o, F_VERSION, AGENT_VERSION);
    field_str(&o, F_BOOT_ID, bid);
    field_int(&o, F_UPTIME_MS, now_ms());
    struct timespec wall;
    clock_gettime(CLOCK_REALTIME, &wall);
    field_int(&o, F_TIME_NS, (int64_t)wall.tv_sec * 1000000000 + wall.tv_nsec);
    frame_send(&o);
    free(o.p);
}

/* ---- parsing --------------------------------------------------------------------------- */

/* The fields of a payload; -1 if they do not exactly fill it. */
static int parse_fields(const unsigned char *p, uint32_t n, int (*each)(void *, int, struct field), void *ctx) {
    uint32_t off = 0;
    while (off < n) {
        if (n - off < 5) return -1;
        uint32_t len = get_u32(p + off + 1);
        if (len > n - off - 5) return -1;
        if (each(ctx, p[off], (struct field){p + off + 5, len}) < 0) return -1;
        off += 5 + len;
    }
    return 0;
}

static int64_t field_to_int(struct field f) {
    uint64_t v = 0;
    for (uint32_t i = 0; i < f.len && i < 8; i++) v = v << 8 | f.p[i];
    return (int64_t)v;
}

static char *field_to_str(struct field f) {
    if (memchr(f.p, 0, f.len)) return NULL;
    char *s = malloc(f.len + 1);
    if (!s) abort();
    memcpy(s, f.p, f.len);
    s[f.len] = 0;
    return s;
}

/* ---- exec ------------------------------------------------------------------------------ */

struct exec_req {
    char *argv[MAX_ARGS + 1], *envp[MAX_ARGS + 8];
    int argc, envc, bad;
    char *cwd;
    struct field in;
    long long timeout_ms;
};

static int on_exec_field(void *ctx, int tag, struct field f) {
    struct exec_req *r = ctx;
    char *s;
    switch (tag) {
    case F_ARG:
        if (r->argc >= MAX_ARGS || !(s = field_to_str(f))) return r->bad = 1, 0;
        r->argv[r->argc++] = s;
        break;
    case F_ENV:
        if (r->envc >= MAX_ARGS || !(s = field_to_str(f)) || !strchr(s, '=')) return r->bad = 1, 0;
        r->envp[r->envc++] = s;
        break;
    case F_CWD: free(r->cwd); if (!(r->cwd = field_to_str(f))) r->bad = 1; break;
    case F_STDIN: r->in = f; break;
    case F_TIMEOUT_MS: r->timeout_ms = field_to_int(f); break;
    }
    return 0;
}

static struct job *find_job(uint32_t id) {
    for (int i = 0; i < MAX_JOBS; i++)
        if (jobs[i].used && jobs[i].id == id) return &jobs[i];
    return NULL;
}

/* Defaults first, then the caller's: a later entry wins in getenv() only if defaults are
 * dropped when overridden, so overridden defaults are left out. */
static void build_env(struct exec_req *r, char **env) {
    static const char *defaults[] = {"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root", "TERM=dumb"};
    int n = 0;
    for (size_t d = 0; d < sizeof defaults / sizeof *defaults; d++) {
        size_t klen = strchr(defaults[d], '=') - defaults[d] + 1;
        int overridden = 0;
        for (int i = 0; i < r->envc; i++) overridden |= !strncmp(r->envp[i], defaults[d], klen);
        if (!overridden) env[n++] = (char *)defaults[d];
    }
    for (int i = 0; i < r->envc; i++) env[n++] = r->envp[i];
    env[n] = NULL;
}

static pid_t spawn(char **argv, char **env, const char *cwd, int in_fd, int out_fd, int err_fd) {
    pid_t pid = fork();
    if (pid != 0) return pid;
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    signal(SIGPIPE, SIG_DFL);
    setsid();
    int null = open("/dev/null", O_RDWR);
    dup2(in_fd >= 0 ? in_fd : null, 0);
    dup2(out_fd, 1);
    dup2(err_fd, 2);
    for (int fd = 3; fd < 1024; fd++) close(fd);
    if (cwd && *cwd && chdir(cwd) < 0) {
        dprintf(2, "metald-agent: cannot enter %s: %s\n", cwd, strerror(errno));
        _exit(126);
    }
    environ = env;
    execvp(argv[0], argv);
    dprintf(2, "metald-agent: cannot run %s: %s\n", argv[0], strerror(errno));
    _exit(errno == ENOENT ? 127 : 126);
}

/* A pipe whose end `ours` does not block; the child's end stays blocking, as programs expect. */
static int pipe_for_us(int p[2], int ours) {
    if (pipe2(p, O_CLOEXEC) < 0) return -1;
    return fcntl(p[ours], F_SETFL, O_NONBLOCK);
}

/* Start argv as job `id`; line mode merges stderr into stdout and collects it. */
static void start_job(uint32_t id, struct exec_req *r, int line_mode) {
    struct job *j = NULL;
    for (int i = 0; i < MAX_JOBS && !j; i++)
        if (!jobs[i].used) j = &jobs[i];
    if (!j || (!line_mode && find_job(id))) {
        send_error(id, j ? EEXIST : EAGAIN, j ? "request id in use" : "too many running commands", NULL);
        return;
    }
    int o[2], e[2] = {-1, -1}, in[2] = {-1, -1};
    if (pipe_for_us(o, 0) < 0 || (!line_mode && pipe_for_us(e, 0) < 0) ||
        (r->in.len && pipe_for_us(in, 1) < 0)) {
        send_error(id, errno, "pipe", strerror(errno));
        return;
    }
    char *env[MAX_ARGS + 8];
    build_env(r, env);
    /* The child's ends must survive its exec: clear CLOEXEC on them in the child via dup2. */
    pid_t pid = spawn(r->argv, env, r->cwd, in[0], o[1], line_mode ? o[1] : e[1]);
    close(o[1]);
    if (e[1] >= 0) close(e[1]);
    if (in[0] >= 0) close(in[0]);
    if (pid < 0) {
        close(o[0]);
        if (e[0] >= 0) close(e[0]);
        if (in[1] >= 0) close(in[1]);
        send_error(id, errno, "fork", strerror(errno));
        return;
    }
    memset(j, 0, sizeof *j);
    j->used = 1;
    j->line_mode = line_mode;
    j->id = id;
    j->pid = pid;
    j->fd[0] = o[0];
    j->fd[1] = e[0];
    j->in_fd = in[1];
    if (r->in.len) {
        j->in_buf = malloc(r->in.len);
        if (!j->in_buf) abort();
        memcpy(j->in_buf, r->in.p, r->in.len);
        j->in_len = r->in.len;
    }
    j->deadline_ms = r->timeout_ms > 0 ? now_ms() + r->timeout_ms : 0;
}

static void job_output(struct job *j, int stream, const unsigned char *data, size_t n) {
    if (j->line_mode) {
        size_t keep = j->text_len + n > MAX_DATA ? MAX_DATA - j->text_len : n;
        j->text = realloc(j->text, j->text_len + keep + 1);
        if (!j->text) abort();
        memcpy(j->text + j->text_len, data, keep);
        j->text_len += keep;
        return;
    }
    uint64_t room = MAX_DATA - j->sent[stream];
    if (n > room) {
        j->truncated = 1;
        n = room;
    }
    if (!n) return;
    j->sent[stream] += n;
    struct out o = {0};
    frame_start(&o, T_OUTPUT, j->id);
    field_int(&o, F_STREAM, stream + 1);
    field_bytes(&o, F_DATA, data, n);
    frame_send(&o);
    free(o.p);
}

/* Read what a job's stream has now; close it at EOF. */
static void drain(struct job *j, int stream) {
    static unsigned char buf[CHUNK];
    while (j->fd[stream] >= 0) {
        ssize_t n = read(j->fd[stream], buf, sizeof buf);
        if (n < 0 && errno == EINTR) continue;
        if (n > 0) {
            job_output(j, stream, buf, (size_t)n);
            continue;
        }
        if (n == 0 || errno != EAGAIN) {
            close(j->fd[stream]);
            j->fd[stream] = -1;
        }
        return;
    }
}

static void close_stdin(struct job *j) {
    if (j->in_fd >= 0) close(j->in_fd);
    j->in_fd = -1;
    free(j->in_buf);
    j->in_buf = NULL;
}

static void feed_stdin(struct job *j) {
    while (j->in_off < j->in_len) {
        ssize_t w = write(j->in_fd, j->in_buf + j->in_off, j->in_len - j->in_off);
        if (w < 0 && errno == EINTR) continue;
        if (w < 0 && errno == EAGAIN) return;
        if (w < 0) break; /* EPIPE: the command does not read its input */
        j->in_off += (size_t)w;
    }
    close_stdin(j);
}

/* The command ended: what it wrote before it ended is in the pipes; background processes it left
 * do not hold the answer back. */
static void finish_job(struct job *j) {
    for (int s = 0; s < 2; s++) {
        drain(j, s);
        if (j->fd[s] >= 0) close(j->fd[s]);
    }
    close_stdin(j);
    int st = j->status;
    int code = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    if (j->line_mode) {
        if (j->text_len && j->text[j->text_len - 1] != '\n') j->text[j->text_len++] = '\n';
        write_port(j->text, j->text_len);
        char tail[32];
        int n = snprintf(tail, sizeof tail, "EXIT %d\n", code);
        write_port(tail, (size_t)n);
        free(j->text);
    } else {
        struct out o = {0};
        frame_start(&o, T_EXIT, j->id);
        field_int(&o, F_CODE, code);
        field_int(&o, F_SIGNAL, WIFSIGNALED(st) ? WTERMSIG(st) : 0);
        field_int(&o, F_TIMED_OUT, j->timed_out);
        field_int(&o, F_TRUNCATED, j->truncated);
        frame_send(&o);
        free(o.p);
    }
    memset(j, 0, sizeof *j);
}

static void reap(void) {
    int st;
    pid_t pid;
    while ((pid = waitpid(-1, &st, WNOHANG)) > 0)
        for (int i = 0; i < MAX_JOBS; i++)
            if (jobs[i].used && jobs[i].pid == pid) {
                jobs[i].status = st;
                finish_job(&jobs[i]);
            }
}

static void free_exec(struct exec_req *r) {
    for (int i = 0; i < r->argc; i++) free(r->argv[i]);
    for (int i = 0; i < r->envc; i++) free(r->envp[i]);
    free(r->cwd);
}

static void handle_exec(uint32_t id, const unsigned char *p, uint32_t n) {
    struct exec_req r = {0};
    if (parse_fields(p, n, on_exec_field, &r) < 0 || r.bad || r.argc == 0)
        send_error(id, EINVAL, "exec needs argv and well-formed fields", NULL);
    else
        start_job(id, &r, 0);
    free_exec(&r);
}

/* ---- files, clock, entropy, power ------------------------------------------------------ */

struct simple_req { struct field path, data; int64_t mode, time_ns; int has_path, has_data, has_time; };

static int on_simple_field(void *ctx, int tag, struct field f) {
    struct simple_req *r = ctx;
    if (tag == F_PATH) r->path = f, r->has_path = 1;
    if (tag == F_DATA || tag == F_ACTION) r->data = f, r->has_data = 1;
    if (tag == F_MODE) r->mode = field_to_int(f);
    if (tag == F_TIME_NS) r->time_ns = field_to_int(f), r->has_time = 1;
    return 0;
}

static void make_parents(char *path) {
    for (char *s = strchr(path + 1, '/'); s; s = strchr(s + 1, '/')) {
        *s = 0;
        mkdir(path, 0755);
        *s = '/';
    }
}

static int write_all_fd(int fd, const unsigned char *p, size_t n) {
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR) continue;
        if (w < 0) return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static void handle_write(uint32_t id, char *path, struct simple_req *r) {
    mode_t mode = r->mode ? (mode_t)(r->mode & 07777) : 0644;
    make_parents(path);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode);
    if (fd < 0) return send_error(id, errno, path, strerror(errno));
    int failed = write_all_fd(fd, r->data.p, r->data.len) < 0 || fchmod(fd, mode) < 0;
    int err = errno;
    if (close(fd) < 0 && !failed) failed = 1, err = errno;
    if (failed) return send_error(id, err, path, strerror(err));
    send_simple(T_OK, id);
}

static void handle_read(uint32_t id, char *path) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return send_error(id, errno, path, strerror(errno));
    struct stat st;
    unsigned char *buf = NULL;
    if (fstat(fd, &st) < 0) {
        send_error(id, errno, path, strerror(errno));
    } else if (S_ISDIR(st.st_mode)) {
        send_error(id, EISDIR, path, "is a directory");
    } else if (!S_ISREG(st.st_mode)) {
        send_error(id, EINVAL, path, "not a regular file");
    } else if ((uint64_t)st.st_size > MAX_DATA) {
        char size[64];
        snprintf(size, sizeof size, "%lld bytes, more than the limit of %u", (long long)st.st_size, MAX_DATA);
        send_error(id, EFBIG, path, size);
    } else {
        size_t got = 0, want = (size_t)st.st_size;
        buf = malloc(want + 1);
        if (!buf) abort();
        ssize_t n = 1;
        while (got < want && (n = read(fd, buf + got, want - got)) != 0) {
            if (n < 0 && errno == EINTR) continue;
            if (n < 0) break;
            got += (size_t)n;
        }
        if (n < 0) {
            send_error(id, errno, path, strerror(errno));
        } else {
            struct out o = {0};
            frame_start(&o, T_FILE, id);
            field_int(&o, F_MODE, st.st_mode & 07777);
            field_int(&o, F_SIZE, (int64_t)got);
            field_bytes(&o, F_DATA, buf, got);
            frame_send(&o);
            free(o.p);
        }
    }
    free(buf);
    close(fd);
}

#define MAX_ENTROPY 4096
#define VM_ID_FILE "/run/metald/vm_id"

/* Credit `data` to the entropy pool and reseed the CRNG at once; -1 with errno on failure. */
static int add_entropy(struct field data) {
    struct rand_pool_info *info = malloc(sizeof *info + data.len);
    if (!info) abort();
    info->entropy_count = (int)data.len * 8;
    info->buf_size = (int)data.len;
    memcpy(info->buf, data.p, data.len);
    int fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC);
    int ok = fd >= 0 && ioctl(fd, RNDADDENTROPY, info) == 0 && ioctl(fd, RNDRESEEDCRNG) == 0;
    int err = errno;
    if (fd >= 0) close(fd);
    free(info);
    errno = err;
    return ok ? 0 : -1;
}

static int set_clock(int64_t ns) {
    struct timespec ts = {.tv_sec = ns / 1000000000, .tv_nsec = ns % 1000000000};
    return clock_settime(CLOCK_REALTIME, &ts);
}

static void handle_entropy(uint32_t id, struct field data) {
    if (data.len == 0 || data.len > MAX_ENTROPY) return send_error(id, EINVAL, "entropy: 1 to 4096 bytes", NULL);
    if (add_entropy(data) < 0) return send_error(id, errno, "entropy", strerror(errno));
    send_simple(T_OK, id);
}

static void handle_clock(uint32_t id, int64_t ns) {
    if (set_clock(ns) < 0) return send_error(id, errno, "clock", strerror(errno));
    send_simple(T_OK, id);
}

/* ---- nics (version 3): a restored clone's MACs, addresses and default routes, without ip(8) ----
 * The same end state as metald_nics in /etc/metald-net.sh, per NIC i (eth<i>, in order): link
 * down, every address flushed, the MAC set, accept_dad off when it gets an IPv6 address, link up,
 * the IPv4 address, its default route (metric 100 + i), the IPv6 address, its default route. */

#define MAX_NICS 16

struct nic {
    unsigned char mac[6], ip4[4], gw4[4], ip6[16], gw6[16];
    int pfx4, pfx6, has_ip4, has_gw4, has_ip6, has_gw6;
};

/* "ADDR[/PFX]" or "" into `addr`; 0 if empty, 1 if set, -1 if malformed. */
static int parse_addr(int family, char *text, unsigned char *addr, int *pfx) {
    if (!*text) return 0;
    int max = family == AF_INET ? 32 : 128;
    char *slash = strchr(text, '/'), *end;
    *pfx = max;
    if (slash) {
        *slash = 0;
        long v = strtol(slash + 1, &end, 10);
        if (slash[1] == 0 || *end || v < 0 || v > max) return -1;
        *pfx = (int)v;
    }
    return inet_pton(family, text, addr) == 1 ? 1 : -1;
}

/* metald-net.sh's NIC argument MAC,IP4/PFX,GW4,IP6/PFX,GW6 (every field but MAC may be empty). */
static int parse_nic(struct field f, struct nic *nic) {
    char *s = field_to_str(f), *part[5], *rest = s;
    int ok = s != NULL, pfx_unused;
    for (int i = 0; ok && i < 5; i++) ok = (part[i] = strsep(&rest, ",")) != NULL;
    ok = ok && rest == NULL;
    unsigned int m[6];
    char tail;
    ok = ok && sscanf(part[0], "%2x:%2x:%2x:%2x:%2x:%2x%c", &m[0], &m[1], &m[2], &m[3], &m[4], &m[5], &tail) == 6;
    for (int i = 0; ok && i < 6; i++) nic->mac[i] = (unsigned char)m[i];
    ok = ok && (nic->has_ip4 = parse_addr(AF_INET, part[1], nic->ip4, &nic->pfx4)) >= 0;
    ok = ok && (nic->has_gw4 = parse_addr(AF_INET, part[2], nic->gw4, &pfx_unused)) >= 0 && !strchr(part[2], '/');
    ok = ok && (nic->has_ip6 = parse_addr(AF_INET6, part[3], nic->ip6, &nic->pfx6)) >= 0;
    ok = ok && (nic->has_gw6 = parse_addr(AF_INET6, part[4], nic->gw6, &pfx_unused)) >= 0 && !strchr(part[4], '/');
    free(s);
    return ok ? 0 : -1;
}

struct nlreq {
    struct nlmsghdr h;
    union { struct ifaddrmsg ifa; struct rtmsg rt; } u;
    unsigned char attrs[128];
};

static void nl_attr(struct nlreq *r, int type, const void *data, size_t n) {
    struct rtattr *a = (struct rtattr *)((char *)r + NLMSG_ALIGN(r->h.nlmsg_len));
    a->rta_type = (unsigned short)type;
    a->rta_len = (unsigned short)RTA_LENGTH(n);
    memcpy(RTA_DATA(a), data, n);
    r->h.nlmsg_len = NLMSG_ALIGN(r->h.nlmsg_len) + RTA_ALIGN(a->rta_len);
}

/* Send one request and wait for its acknowledgement; -1 with errno if the kernel refused it. */
static int nl_talk(int nl, struct nlmsghdr *h) {
    static uint32_t seq;
    h->nlmsg_seq = ++seq;
    h->nlmsg_flags |= NLM_F_REQUEST | NLM_F_ACK;
    if (send(nl, h, h->nlmsg_len, 0) < 0) return -1;
    char buf[8192];
    for (;;) {
        ssize_t n = recv(nl, buf, sizeof buf, 0);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) return -1;
        for (struct nlmsghdr *m = (struct nlmsghdr *)buf; NLMSG_OK(m, (size_t)n); m = NLMSG_NEXT(m, n)) {
            if (m->nlmsg_seq != seq || m->nlmsg_type != NLMSG_ERROR) continue;
            int err = ((struct nlmsgerr *)NLMSG_DATA(m))->error;
            if (err == 0) return 0;
            errno = -err;
            return -1;
        }
    }
}

/* Delete every address of interface `index` (ip addr flush dev): dump them all, then delete each. */
static int flush_addrs(int nl, int index) {
    struct { struct nlmsghdr h; struct ifaddrmsg ifa; } dump = {
        .h = {.nlmsg_len = sizeof dump, .nlmsg_type = RTM_GETADDR, .nlmsg_flags = NLM_F_REQUEST | NLM_F_DUMP},
    };
    if (send(nl, &dump, sizeof dump, 0) < 0) return -1;
    char buf[16384], *doomed = NULL;
    size_t doomed_len = 0;
    int done = 0, err = 0;
    while (!done) {
        ssize_t n = recv(nl, buf, sizeof buf, 0);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) { err = errno; break; }
        for (struct nlmsghdr *m = (struct nlmsghdr *)buf; NLMSG_OK(m, (size_t)n); m = NLMSG_NEXT(m, n)) {
            if (m->nlmsg_type == NLMSG_DONE || m->nlmsg_type == NLMSG_ERROR) { done = 1; break; }
            if (m->nlmsg_type != RTM_NEWADDR || ((struct ifaddrmsg *)NLMSG_DATA(m))->ifa_index != (unsigned)index) continue;
            doomed = realloc(doomed, doomed_len + NLMSG_ALIGN(m->nlmsg_len));
            if (!doomed) abort();
            memcpy(doomed + doomed_len, m, m->nlmsg_len);
            doomed_len += NLMSG_ALIGN(m->nlmsg_len);
        }
    }
    for (size_t off = 0; !err && off < doomed_len;) {
        struct nlmsghdr *m = (struct nlmsghdr *)(doomed + off);
        off += NLMSG_ALIGN(m->nlmsg_len);
        m->nlmsg_type = RTM_DELADDR;
        m->nlmsg_flags = 0;
        if (nl_talk(nl, m) < 0 && errno != EADDRNOTAVAIL) err = errno;
    }
    free(doomed);
    errno = err;
    return err ? -1 : 0;
}

static int add_addr(int nl, int index, int family, const unsigned char *addr, int pfx) {
    struct nlreq r = {.h = {.nlmsg_len = NLMSG_LENGTH(sizeof r.u.ifa), .nlmsg_type = RTM_NEWADDR,
                            .nlmsg_flags = NLM_F_CREATE | NLM_F_EXCL},
                      .u.ifa = {.ifa_family = (unsigned char)family, .ifa_prefixlen = (unsigned char)pfx,
                                .ifa_index = (unsigned)index}};
    size_t n = family == AF_INET ? 4 : 16;
    nl_attr(&r, IFA_LOCAL, addr, n);
    nl_attr(&r, IFA_ADDRESS, addr, n);
    return nl_talk(nl, &r.h);
}

/* ip route add default via GW dev DEV metric METRIC (protocol boot, table main). */
static int add_default_route(int nl, int index, int family, const unsigned char *gw, uint32_t metric) {
    struct nlreq r = {.h = {.nlmsg_len = NLMSG_LENGTH(sizeof r.u.rt), .nlmsg_type = RTM_NEWROUTE,
                            .nlmsg_flags = NLM_F_CREATE | NLM_F_EXCL},
                      .u.rt = {.rtm_family = (unsigned char)family, .rtm_table = RT_TABLE_MAIN,
                               .rtm_protocol = RTPROT_BOOT, .rtm_scope = RT_SCOPE_UNIVERSE, .rtm_type = RTN_UNICAST}};
    uint32_t oif = (uint32_t)index;
    nl_attr(&r, RTA_GATEWAY, gw, family == AF_INET ? 4 : 16);
    nl_attr(&r, RTA_OIF, &oif, sizeof oif);
    nl_attr(&r, RTA_PRIORITY, &metric, sizeof metric);
    return nl_talk(nl, &r.h);
}

static int set_up(int sock, const char *dev, int up) {
    struct ifreq ifr = {0};
    snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "%s", dev);
    if (ioctl(sock, SIOCGIFFLAGS, &ifr) < 0) return -1;
    ifr.ifr_flags = (short)(up ? ifr.ifr_flags | IFF_UP : ifr.ifr_flags & ~IFF_UP);
    return ioctl(sock, SIOCSIFFLAGS, &ifr);
}

static int set_mac(int sock, const char *dev, const unsigned char *mac) {
    struct ifreq ifr = {0};
    snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "%s", dev);
    ifr.ifr_hwaddr.sa_family = ARPHRD_ETHER;
    memcpy(ifr.ifr_hwaddr.sa_data, mac, 6);
    return ioctl(sock, SIOCSIFHWADDR, &ifr);
}

/* As metald-net.sh's `echo 0 > accept_dad`, whose failure the script ignores (the IPv6 address
 * that follows fails clearly if the guest has no IPv6). */
static void dad_off(const char *dev) {
    char path[96];
    snprintf(path, sizeof path, "/proc/sys/net/ipv6/conf/%s/accept_dad", dev);
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd >= 0 && write(fd, "0\n", 2) < 0) { /* ignored, as in the script */ }
    if (fd >= 0) close(fd);
}

/* One NIC; on failure -1 with errno and `step` naming what failed. */
static int configure_nic(int sock, int nl, int i, const struct nic *nic, const char **step) {
    char dev[IFNAMSIZ];
    snprintf(dev, sizeof dev, "eth%d", i);
    int index = (int)if_nametoindex(dev);
    uint32_t metric = 100 + (uint32_t)i;
    if (!index) return *step = "interface", -1;
    if (set_up(sock, dev, 0) < 0) return *step = "link down", -1;
    if (flush_addrs(nl, index) < 0) return *step = "address flush", -1;
    if (set_mac(sock, dev, nic->mac) < 0) return *step = "MAC", -1;
    if (nic->has_ip6) dad_off(dev);
    if (set_up(sock, dev, 1) < 0) return *step = "link up", -1;
    if (nic->has_ip4 && add_addr(nl, index, AF_INET, nic->ip4, nic->pfx4) < 0) return *step = "IPv4 address", -1;
    if (nic->has_gw4 && add_default_route(nl, index, AF_INET, nic->gw4, metric) < 0) return *step = "IPv4 default route", -1;
    if (nic->has_ip6 && add_addr(nl, index, AF_INET6, nic->ip6, nic->pfx6) < 0) return *step = "IPv6 address", -1;
    if (nic->has_gw6 && add_default_route(nl, index, AF_INET6, nic->gw6, metric) < 0) return *step = "IPv6 default route", -1;
    return 0;
}

/* Every NIC in order; on failure -1 with errno and `what` naming the interface and the step. */
static int configure_nics(const struct nic *nics, int count, char *what, size_t what_len) {
    int sock = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    int nl = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE);
    const char *step = "netlink socket";
    int i = 0, failed = sock < 0 || nl < 0;
    for (; !failed && i < count; i++) failed = configure_nic(sock, nl, i, &nics[i], &step) < 0;
    int err = errno;
    if (sock >= 0) close(sock);
    if (nl >= 0) close(nl);
    if (failed) snprintf(what, what_len, "eth%d: %s", i > 0 ? i - 1 : 0, step);
    errno = err;
    return failed ? -1 : 0;
}

/* ---- refresh: a restored clone's own clock, entropy, hostname and vm_id, in one request ---- */

struct refresh_req {
    struct field entropy, host, vm_id;
    int64_t time_ns;
    int has_time, has_entropy, has_host, has_vm_id, nic_count, bad_nic;
    struct nic nics[MAX_NICS];
};

static int on_refresh_field(void *ctx, int tag, struct field f) {
    struct refresh_req *r = ctx;
    if (tag == F_TIME_NS) r->time_ns = field_to_int(f), r->has_time = 1;
    if (tag == F_DATA) r->entropy = f, r->has_entropy = 1;
    if (tag == F_HOSTNAME) r->host = f, r->has_host = 1;
    if (tag == F_VM_ID) r->vm_id = f, r->has_vm_id = 1;
    if (tag == F_NIC && !r->bad_nic) {
        if (r->nic_count == MAX_NICS || parse_nic(f, &r->nics[r->nic_count]) < 0) r->bad_nic = r->nic_count + 1;
        else r->nic_count++;
    }
    return 0;
}

static int write_vm_id(struct field vm_id) {
    mkdir("/run/metald", 0755);
    int fd = open(VM_ID_FILE, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) return -1;
    int failed = write_all_fd(fd, vm_id.p, vm_id.len) < 0 || write_all_fd(fd, (const unsigned char *)"\n", 1) < 0;
    int err = errno;
    if (close(fd) < 0 && !failed) failed = 1, err = errno;
    errno = err;
    return failed ? -1 : 0;
}

/* Every field is checked before anything is changed; then clock, entropy, hostname, vm_id file, NICs
 * in that order (the clock first: it is the one a delay makes wrong). ERROR names the step that
 * failed; OK carries the agent's version, which tells the host that the NICs were set (version 3). */
static void handle_refresh(uint32_t id, const unsigned char *p, uint32_t n) {
    struct refresh_req r = {0};
    if (parse_fields(p, n, on_refresh_field, &r) < 0) return send_error(id, EINVAL, "malformed fields", NULL);
    if (r.has_entropy && (r.entropy.len == 0 || r.entropy.len > MAX_ENTROPY))
        return send_error(id, EINVAL, "entropy: 1 to 4096 bytes", NULL);
    if (r.has_host && (r.host.len == 0 || r.host.len > HOST_NAME_MAX || memchr(r.host.p, 0, r.host.len)))
        return send_error(id, EINVAL, "hostname: 1 to 64 bytes, no NUL", NULL);
    if (r.has_vm_id && (r.vm_id.len > 255 || memchr(r.vm_id.p, 0, r.vm_id.len) || memchr(r.vm_id.p, '\n', r.vm_id.len)))
        return send_error(id, EINVAL, "vm_id: at most 255 bytes, one line", NULL);
    if (r.bad_nic) return send_error(id, EINVAL, "nic: at most 16, each MAC,IP4/PFX,GW4,IP6/PFX,GW6", NULL);
    if (r.has_time && set_clock(r.time_ns) < 0) return send_error(id, errno, "clock", strerror(errno));
    if (r.has_entropy && add_entropy(r.entropy) < 0) return send_error(id, errno, "entropy", strerror(errno));
    if (r.has_host && sethostname((const char *)r.host.p, r.host.len) < 0)
        return send_error(id, errno, "hostname", strerror(errno));
    if (r.has_vm_id && write_vm_id(r.vm_id) < 0) return send_error(id, errno, VM_ID_FILE, strerror(errno));
    char what[64];
    if (r.nic_count && configure_nics(r.nics, r.nic_count, what, sizeof what) < 0)
        return send_error(id, errno, what, strerror(errno));
    struct out o = {0};
    frame_start(&o, T_OK, id);
    field_str(&o, F_VERSION, AGENT_VERSION);
    frame_send(&o);
    free(o.p);
}

/* busybox init: SIGTERM reboots, SIGUSR2 powers off (after running ::shutdown). */
static int power(const char *action) {
    if (!strcmp(action, "reboot")) return kill(1, SIGTERM);
    if (!strcmp(action, "poweroff")) return kill(1, SIGUSR2);
    errno = EINVAL;
    return -1;
}

static void handle_simple(int type, uint32_t id, const unsigned char *p, uint32_t n) {
    struct simple_req r = {0};
    if (parse_fields(p, n, on_simple_field, &r) < 0) return send_error(id, EINVAL, "malformed fields", NULL);
    char *text = NULL;
    if (type == T_WRITE || type == T_READ) {
        if (!r.has_path || !(text = field_to_str(r.path)) || text[0] != '/') {
            free(text);
            return send_error(id, EINVAL, "path must be absolute", NULL);
        }
        if (type == T_WRITE) handle_write(id, text, &r);
        else handle_read(id, text);
    } else if (type == T_ENTROPY) {
        handle_entropy(id, r.data);
    } else if (type == T_CLOCK) {
        if (!r.has_time) return send_error(id, EINVAL, "clock needs a time", NULL);
        handle_clock(id, r.time_ns);
    } else if (type == T_POWER) {
        if (!r.has_data || !(text = field_to_str(r.data))) return send_error(id, EINVAL, "power needs an action", NULL);
        if (strcmp(text, "reboot") && strcmp(text, "poweroff")) send_error(id, EINVAL, "unknown action", text);
        else send_simple(T_OK, id), power(text);
    }
    free(text);
}

/* ---- dispatch -------------------------------------------------------------------------- */

static void handle_frame(int type, uint32_t id, const unsigned char *p, uint32_t n) {
    struct job *j;
    switch (type) {
    case T_PING: send_pong(id); break;
    case T_EXEC: handle_exec(id, p, n); break;
    case T_KILL:
        if ((j = find_job(id))) kill(-j->pid, SIGKILL), kill(j->pid, SIGKILL);
        break;
    case T_WRITE: case T_READ: case T_CLOCK: case T_ENTROPY: case T_POWER:
        handle_simple(type, id, p, n);
        break;
    case T_REFRESH: handle_refresh(id, p, n); break;
    default: send_error(id, ENOSYS, "unknown message type", NULL);
    }
}

static void handle_line(char *line) {
    size_t n = strlen(line);
    if (n && line[n - 1] == '\r') line[--n] = 0;
    if (!strcmp(line, "ping") || !strncmp(line, "ping ", 5)) {
        write_port("pong", 4);
        write_port(line + 4, n - 4);
        write_port("\n", 1);
    } else if (!strcmp(line, "reboot") || !strcmp(line, "poweroff")) {
        write_port("ok\n", 3);
        power(line);
    } else if (!strncmp(line, "exec ", 5)) {
        struct exec_req r = {.argv = {"sh", "-c", line + 5, NULL}, .argc = 3};
        start_job(0, &r, 1);
    } else {
        write_port("ERR unknown command\n", 20);
    }
}

/* Take every complete message out of inbuf. A bad frame makes the rest of this connection's input
 * meaningless: it is dropped (the host resets the channel when told). */
static void process_input(void) {
    size_t off = 0;
    while (off < in_len) {
        unsigned char *m = inbuf + off;
        size_t left = in_len - off;
        if (m[0] != MAGIC) {
            unsigned char *nl = memchr(m, '\n', left);
            if (!nl) {
                if (left > MAX_LINE) off = in_len; /* garbage: no line that long */
                break;
            }
            *nl = 0;
            handle_line((char *)m);
            off += (size_t)(nl - m) + 1;
            continue;
        }
        if (left < HDR) break;
        uint32_t len = get_u32(m + 8);
        if (m[1] != PROTO_VERSION || len > MAX_PAYLOAD) {
            send_error(get_u32(m + 4), EPROTO, m[1] != PROTO_VERSION ? "unsupported protocol version" : "frame too large", NULL);
            off = in_len;
            break;
        }
        if (left < HDR + (size_t)len) {
            if (in_cap < HDR + (size_t)len) { /* room for the whole frame, once */
                memmove(inbuf, m, left);
                in_len = left;
                off = 0;
                in_cap = HDR + (size_t)len;
                inbuf = realloc(inbuf, in_cap);
                if (!inbuf) abort();
            }
            break;
        }
        handle_frame(m[2], get_u32(m + 4), m + HDR, len);
        off += HDR + len;
    }
    memmove(inbuf, inbuf + off, in_len - off);
    in_len -= off;
}

static void read_port(void) {
    if (in_len == 0 && in_cap > 4 * CHUNK) { /* give back what a large frame took */
        free(inbuf);
        inbuf = NULL;
        in_cap = 0;
    }
    if (in_cap - in_len < CHUNK) {
        in_cap = in_len + CHUNK;
        inbuf = realloc(inbuf, in_cap);
        if (!inbuf) abort();
    }
    ssize_t n = read(port, inbuf + in_len, in_cap - in_len);
    if (n < 0 && errno == EINTR) return;
    if (n <= 0) {
        host_up = 0;
        in_len = 0;
        return;
    }
    in_len += (size_t)n;
    process_input();
}

/* Whether a host is connected to the port now (poll reports POLLHUP while none is). Nothing is
 * sent unasked: a version 0 client must see only answers. */
static void probe_host(void) {
    struct pollfd p = {port, POLLIN, 0};
    int was = host_up;
    if (poll(&p, 1, 0) < 0) return;
    host_up = !(p.revents & POLLHUP) || (p.revents & POLLIN);
    if (host_up && !was) in_len = 0; /* a new connection starts at a message boundary */
}

static char *find_port(void) {
    static char dev[PATH_MAX];
    DIR *d = opendir("/sys/class/virtio-ports");
    struct dirent *e;
    char path[PATH_MAX], name[128];
    while (d && (e = readdir(d))) {
        if (e->d_name[0] == '.') continue;
        snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/name", e->d_name);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0) continue;
        ssize_t n = read(fd, name, sizeof name - 1);
        close(fd);
        name[n > 0 ? n : 0] = 0;
        name[strcspn(name, "\n")] = 0;
        if (!strcmp(name, PORT_NAME)) {
            snprintf(dev, sizeof dev, "/dev/%s", e->d_name);
            closedir(d);
            return dev;
        }
    }
    if (d) closedir(d);
    return NULL;
}

int main(void) {
    signal(SIGPIPE, SIG_IGN);
    char *dev = find_port();
    if (!dev) /* no agent port on this VM: idle rather than let init respawn us in a loop */
        for (;;) pause();
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGCHLD);
    sigaddset(&set, SIGIO);
    sigprocmask(SIG_BLOCK, &set, NULL);
    int sfd = signalfd(-1, &set, SFD_CLOEXEC | SFD_NONBLOCK);
    port = open(dev, O_RDWR | O_CLOEXEC);
    if (port < 0 || sfd < 0) return 1;
    fcntl(port, F_SETOWN, getpid());
    fcntl(port, F_SETFL, fcntl(port, F_GETFL) | O_ASYNC);
    probe_host();
    for (;;) {
        struct pollfd fds[2 + 3 * MAX_JOBS];
        struct job *owner[2 + 3 * MAX_JOBS];
        int kind[2 + 3 * MAX_JOBS];
        int n = 0;
        long long next = 0;
        fds[n++] = (struct pollfd){sfd, POLLIN, 0};
        fds[n++] = (struct pollfd){host_up ? port : -1, POLLIN, 0};
        for (int i = 0; i < MAX_JOBS; i++) {
            struct job *j = &jobs[i];
            if (!j->used) continue;
            for (int s = 0; s < 2; s++)
                if (j->fd[s] >= 0) owner[n] = j, kind[n] = s, fds[n++] = (struct pollfd){j->fd[s], POLLIN, 0};
            if (j->in_fd >= 0) owner[n] = j, kind[n] = 2, fds[n++] = (struct pollfd){j->in_fd, POLLOUT, 0};
            if (j->deadline_ms && !j->timed_out && (!next || j->deadline_ms < next)) next = j->deadline_ms;
        }
        long long wait = next ? next - now_ms() : -1;
        if (next && wait < 0) wait = 0;
        if (poll(fds, (nfds_t)n, (int)(wait > INT_MAX ? INT_MAX : wait)) < 0 && errno != EINTR) return 1;
        for (int i = 2; i < n; i++) {
            if (!fds[i].revents || !owner[i]->used) continue;
            if (kind[i] == 2) feed_stdin(owner[i]);
            else drain(owner[i], kind[i]);
        }
        if (fds[1].revents & POLLIN) read_port();
        else if (fds[1].revents & (POLLHUP | POLLERR)) host_up = 0, in_len = 0;
        if (fds[0].revents & POLLIN) {
            struct signalfd_siginfo si;
            while (read(sfd, &si, sizeof si) == sizeof si) {}
            reap();
            probe_host();
        }
        long long t = now_ms();
        for (int i = 0; i < MAX_JOBS; i++)
            if (jobs[i].used && jobs[i].deadline_ms && !jobs[i].timed_out && jobs[i].deadline_ms <= t) {
                jobs[i].timed_out = 1;
                kill(-jobs[i].pid, SIGKILL); /* its process group (setsid), and it if not yet */
                kill(jobs[i].pid, SIGKILL);
            }
    }
}
