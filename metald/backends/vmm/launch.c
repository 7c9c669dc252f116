/* The per-VM supervisor's first step, in C so that the VMM's start never waits for Python's:
 *   launch --python=PATH --vm-dir=DIR [--fd=N]... [--cgroup=DIR]... [--relay=...]... -- CMD...
 * forks CMD (the VMM) and then execs, in the same process (same pid, same session),
 *   PATH -S -m metald.backends.vmm.supervisor --vmm-pid=PID --report-fd=FD <the same options>
 * The child dies with its parent, joins each --cgroup, gets /dev/null as stdin and stderr as
 * stdout, keeps only stdin/out/err, the --fd descriptors and the close-on-exec report pipe, and
 * execs CMD; a failure is written to the report pipe (the supervisor reads it) and exits 127. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <unistd.h>

#define MODULE "metald.backends.vmm.supervisor"
#define MAX_FDS 256

static int report = -1;

static void fail(const char *what, const char *arg) {
    char text[512];
    int n = snprintf(text, sizeof text, "%s %s: %s", what, arg, strerror(errno));
    if (n > 0 && write(report, text, (size_t)n < sizeof text ? (size_t)n : sizeof text - 1) < 0) {
    }
    _exit(127);
}

static int compare(const void *a, const void *b) { return *(const int *)a - *(const int *)b; }

static void keep_only(int *keep, int count) {
    qsort(keep, (size_t)count, sizeof *keep, compare);
    unsigned low = 3;
    for (int i = 0; i < count; i++) {
        if ((unsigned)keep[i] > low) close_range(low, (unsigned)keep[i] - 1, 0);
        if ((unsigned)keep[i] + 1 > low) low = (unsigned)keep[i] + 1;
    }
    close_range(low, ~0U, 0);
}

static void exec_vmm(pid_t parent, char **argv, int split, const int *fds, int nfds) {
    int keep[MAX_FDS + 1];
    if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) != 0) fail("prctl", "PR_SET_PDEATHSIG");
    if (getppid() != parent) _exit(1);
    char pid[24];
    int len = snprintf(pid, sizeof pid, "%d", (int)getpid());
    for (int i = 2; i < split; i++) {
        if (strncmp(argv[i], "--cgroup=", 9) != 0) continue;
        char path[4096];
        snprintf(path, sizeof path, "%s/cgroup.procs", argv[i] + 9);
        int procs = open(path, O_WRONLY | O_CLOEXEC);
        if (procs < 0 || write(procs, pid, (size_t)len) != len) fail("cannot join", path);
        close(procs);
    }
    int null = open("/dev/null", O_RDONLY);
    if (null < 0 || dup2(null, 0) < 0 || dup2(2, 1) < 0) fail("cannot redirect", "stdin/stdout");
    for (int i = 0; i < nfds; i++) keep[i] = fds[i];
    keep[nfds] = report;
    keep_only(keep, nfds + 1);
    for (int i = 0; i < nfds; i++)
        if (fcntl(fds[i], F_SETFD, 0) < 0) fail("cannot pass descriptor", "--fd");
    signal(SIGPIPE, SIG_DFL);
    signal(SIGXFSZ, SIG_DFL);
    execvp(argv[split + 1], argv + split + 1);
    fail("cannot exec", argv[split + 1]);
}

int main(int argc, char **argv) {
    int split = 0, nfds = 0, fds[MAX_FDS];
    for (int i = 1; i < argc && !split; i++)
        if (strcmp(argv[i], "--") == 0) split = i;
    if (argc < 2 || strncmp(argv[1], "--python=", 9) != 0 || !split || split + 1 >= argc) {
        fprintf(stderr, "usage: launch --python=PATH SUPERVISOR-OPTIONS... -- CMD [ARG...]\n");
        return 2;
    }
    for (int i = 2; i < split; i++)
        if (strncmp(argv[i], "--fd=", 5) == 0 && nfds < MAX_FDS) fds[nfds++] = atoi(argv[i] + 5);
    int pipe_fds[2];
    if (pipe2(pipe_fds, O_CLOEXEC) != 0) {
        perror("launch: pipe");
        return 1;
    }
    report = pipe_fds[1];
    pid_t parent = getpid();
    pid_t child = fork();
    if (child < 0) {
        perror("launch: fork");
        return 1;
    }
    if (child == 0) {
        close(pipe_fds[0]);
        exec_vmm(parent, argv, split, fds, nfds);
    }
    close(report);
    if (fcntl(pipe_fds[0], F_SETFD, 0) < 0) {  /* the supervisor reads it after the exec */
        perror("launch: fcntl");
        return 1;
    }
    char vmm_pid[40], report_fd[40];
    snprintf(vmm_pid, sizeof vmm_pid, "--vmm-pid=%d", (int)child);
    snprintf(report_fd, sizeof report_fd, "--report-fd=%d", pipe_fds[0]);
    char **args = calloc((size_t)argc + 6, sizeof *args);
    if (args == NULL) return 1;
    int n = 0;
    args[n++] = argv[1] + 9;
    args[n++] = "-S";
    args[n++] = "-m";
    args[n++] = MODULE;
    args[n++] = vmm_pid;
    args[n++] = report_fd;
    for (int i = 2; i < argc; i++) args[n++] = argv[i];
    execv(args[0], args);
    perror("launch: exec the supervisor");
    kill(child, SIGKILL); /* no VMM runs unsupervised */
    return 1;
}
