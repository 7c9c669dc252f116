"""A VMM process under its supervisor: spawn or re-attach, signal it, learn of its end without polling.

The end is seen through a pidfd on the supervisor, which exits right after reaping the VMM and
writing exit.json; the VMM itself is signalled through its own pidfd, so a recycled pid is never hit.
Which process is a VM's VMM is for the backend to say (a command-line matcher): the supervisor runs
whatever command it is given.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import metald
from metald.backends import procfs
from metald.backends.vmm import cgroups, layout
from metald.backends.vmm.jsonfile import read_json
from metald.backends.vmm.launcher import launcher
from metald.backends.vmm.relay import Relay

log = logging.getLogger(__name__)

_PACKAGE_ROOT = str(Path(metald.__file__).resolve().parent.parent)

# Whether a process command line is the VMM of a given VM (checked before re-adopting a pid).
CmdlineMatcher = Callable[[Sequence[str]], bool]


class VmmStartError(Exception):
    """The VMM (or its supervisor) ended before it was up; `tail`: the end of its log."""

    def __init__(self, tail: str) -> None:
        super().__init__(f"the VMM did not start or exited at once: {tail}")
        self.tail = tail


@dataclass(frozen=True)
class VmmIdentity:
    pid: int
    start_time: int
    supervisor_pid: int
    supervisor_start_time: int
    cgroup: tuple[str, ...] = ()  # the VMM's cgroup directories


@dataclass(frozen=True)
class ExitInfo:
    """How a VMM ended, as its supervisor recorded it."""

    returncode: int | None  # negative: killed by that signal; None: unknown (supervisor gone)
    oom_killed: bool = False


def exit_reason(info: ExitInfo, *, guest_poweroff: bool | None = None) -> str:
    """ "oom_killed", "guest_poweroff" (exit status 0, unless the VMM knows the guest did not ask for
    it) or "vmm_crashed"."""
    if info.oom_killed:
        return "oom_killed"
    return "guest_poweroff" if info.returncode == 0 and guest_poweroff is not False else "vmm_crashed"


def read_log_tail(vm_dir: Path, since: int = 0, limit: int = 2000) -> str:
    """The end of vmm.log written after offset `since` (the log is appended to at every start)."""
    try:
        with open(vm_dir / layout.VMM_LOG, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(since, f.tell() - limit))
            return f.read().decode(errors="replace").strip()
    except FileNotFoundError:
        return ""


def _read_identity(vm_dir: Path) -> VmmIdentity | None:
    data = read_json(vm_dir / layout.VMM_STATE)
    if data is None:
        return None
    try:
        ints = {k: int(data[k]) for k in ("pid", "start_time", "supervisor_pid", "supervisor_start_time")}
        return VmmIdentity(**ints, cgroup=tuple(str(d) for d in data.get("cgroup", ())))
    except (KeyError, TypeError, ValueError):
        return None


def read_exit(vm_dir: Path) -> ExitInfo | None:
    """What exit.json says of the VMM's end, None if there is none (still running, or never ran)."""
    data = read_json(vm_dir / layout.EXIT_STATE)
    if data is None:
        return None
    returncode = data.get("returncode")
    return ExitInfo(returncode if isinstance(returncode, int) else None, data.get("oom_killed") is True)


async def remove_cgroup(dirs: Sequence[Path]) -> None:
    """Remove a VMM's cgroup directories; a failure is logged (it leaks a cgroup, nothing else)."""
    try:
        await asyncio.to_thread(cgroups.remove_dirs, dirs)
    except OSError as e:
        log.warning("cannot remove cgroup %s: %s", e.filename, e.strerror)


def remove_state_files(vm_dir: Path) -> None:
    for name in layout.STATE_FILES:
        with contextlib.suppress(FileNotFoundError):
            (vm_dir / name).unlink()


class VmmProcess:
    def __init__(self, vm_dir: Path, ident: VmmIdentity, vmm_fd: int, supervisor_fd: int) -> None:
        self.vm_dir = vm_dir
        self.ident = ident
        self._vmm_fd = vmm_fd
        self._supervisor_fd = supervisor_fd
        self._child: subprocess.Popen[bytes] | None = None  # the supervisor, if this daemon started it
        self.log_offset = 0  # where this run's part of vmm.log begins
        self._loop = asyncio.get_running_loop()
        self.exited: asyncio.Future[ExitInfo] = self._loop.create_future()
        self._finisher: asyncio.Task[None] | None = None
        self._loop.add_reader(supervisor_fd, self._on_supervisor_exit)

    @property
    def pid(self) -> int:
        return self.ident.pid

    @property
    def cgroup(self) -> list[Path]:
        return [Path(d) for d in self.ident.cgroup]

    @property
    def running(self) -> bool:
        return not self.exited.done()

    @classmethod
    async def spawn(
        cls,
        vm_dir: Path,
        argv: Sequence[str],
        *,
        timeout: float = 10.0,
        pass_fds: Sequence[int] = (),
        cgroup: Sequence[Path] = (),
        relays: Sequence[Relay] = (),
    ) -> VmmProcess:
        """Start the supervisor (own session: it outlives the daemon) and, through it, the VMM, which
        inherits `pass_fds` and starts in the cgroup directories `cgroup` (removed on failure); the
        supervisor copies what the VMM writes into each relay's pipe to its bounded file."""
        try:
            child, log_offset = await cls._start_supervisor(vm_dir, argv, pass_fds, cgroup, relays)
        except BaseException:
            await remove_cgroup(cgroup)
            raise
        try:
            return await cls._await_start(vm_dir, child, timeout, log_offset)
        except BaseException:  # failed or cancelled: leave nothing running
            with contextlib.suppress(ProcessLookupError):
                child.kill()  # the VMM follows through its parent-death signal
            await asyncio.to_thread(child.wait)
            await remove_cgroup(cgroup)
            raise

    @staticmethod
    async def _start_supervisor(
        vm_dir: Path,
        argv: Sequence[str],
        pass_fds: Sequence[int],
        cgroup: Sequence[Path],
        relays: Sequence[Relay],
    ) -> tuple[subprocess.Popen[bytes], int]:
        """The supervisor process, and where its part of vmm.log begins.

        A plain Popen, not an asyncio subprocess: asyncio kills the subprocesses it still tracks when
        its loop shuts down (a SIGTERM'd daemon), and the supervisor must outlive the daemon."""
        await asyncio.to_thread(remove_state_files, vm_dir)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PACKAGE_ROOT, env.get("PYTHONPATH")]))
        options = [
            f"--vm-dir={vm_dir}",
            *(f"--fd={fd}" for fd in pass_fds),
            *(f"--cgroup={d}" for d in cgroup),
            *(relay.option() for relay in relays),
        ]
        # The launcher (vmm/launch.c) forks the VMM and execs `python -S -m metald.backends.vmm.
        # supervisor` in its place: the VMM's start waits for no Python start. -S: no site module
        # (the supervisor needs the standard library and this package only, on PYTHONPATH).
        command = [str(await launcher()), f"--python={sys.executable}", *options, "--", *argv]

        def start() -> tuple[subprocess.Popen[bytes], int]:
            log_fd = os.open(
                vm_dir / layout.VMM_LOG,
                os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o640,
            )
            try:
                log_offset = os.fstat(log_fd).st_size
                child = subprocess.Popen(
                    command,
                    cwd=vm_dir,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=log_fd,
                    start_new_session=True,
                    pass_fds=[*pass_fds, *(relay.source for relay in relays)],
                )
            finally:
                os.close(log_fd)
            return child, log_offset

        return await asyncio.to_thread(start)

    @classmethod
    async def _await_start(
        cls, vm_dir: Path, child: subprocess.Popen[bytes], timeout: float, log_offset: int
    ) -> VmmProcess:
        assert child.stdout is not None
        try:  # the reading thread ends when the supervisor does (killed on failure)
            line = await asyncio.wait_for(asyncio.to_thread(child.stdout.readline), timeout)
        except TimeoutError:
            line = b""
        finally:
            if line:
                child.stdout.close()
        ident = await asyncio.to_thread(_read_identity, vm_dir) if line.strip() else None
        vmm = cls._open(vm_dir, ident) if ident is not None else None
        if vmm is None:
            tail = await asyncio.to_thread(read_log_tail, vm_dir, log_offset)
            raise VmmStartError(tail)
        vmm._child = child
        vmm.log_offset = log_offset
        return vmm

    @classmethod
    async def attach(cls, vm_dir: Path, matches: CmdlineMatcher) -> VmmProcess | None:
        """Re-attach to the VMM recorded in vm_dir if it still runs and `matches` its command line."""
        ident = await asyncio.to_thread(_read_identity, vm_dir)
        if ident is None:
            return None
        vmm = cls._open(vm_dir, ident)  # pidfds first, then the command line: no pid-reuse window
        if vmm is not None and not matches(procfs.read_cmdline(ident.pid)):
            vmm.detach()
            return None
        return vmm

    @classmethod
    def _open(cls, vm_dir: Path, ident: VmmIdentity) -> VmmProcess | None:
        """Pidfds on the VMM and its supervisor, opened first and then checked: no pid-reuse window."""
        fds: list[int] = []
        try:
            for pid in (ident.pid, ident.supervisor_pid):
                fds.append(os.pidfd_open(pid))
        except ProcessLookupError:
            pass
        alive = len(fds) == 2 and (
            procfs.is_live(ident.pid, ident.start_time)
            and procfs.is_live(ident.supervisor_pid, ident.supervisor_start_time)
        )
        if not alive:
            for fd in fds:
                os.close(fd)
            return None
        return cls(vm_dir, ident, fds[0], fds[1])

    def _on_supervisor_exit(self) -> None:
        self._loop.remove_reader(self._supervisor_fd)
        self._finisher = asyncio.create_task(self._finish())

    async def _finish(self) -> None:
        info = await asyncio.to_thread(read_exit, self.vm_dir) or ExitInfo(None)
        if info.returncode is None:  # supervisor killed: the VMM follows (parent-death signal), and
            self.kill()  # its cgroup, which the supervisor did not get to remove, goes too
            await remove_cgroup(self.cgroup)
        if self._child is not None:
            await asyncio.to_thread(self._child.wait)  # it has ended: reaps it at once
        self._close_fds()
        if not self.exited.done():
            self.exited.set_result(info)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError, OSError):
            signal.pidfd_send_signal(self._vmm_fd, sig)

    def _close_fds(self) -> None:
        for fd in (self._vmm_fd, self._supervisor_fd):
            if fd >= 0:
                os.close(fd)
        self._vmm_fd = self._supervisor_fd = -1

    def detach(self) -> None:
        """Stop watching without touching the VMM (daemon shutdown)."""
        if self._supervisor_fd >= 0 and self._finisher is None:
            self._loop.remove_reader(self._supervisor_fd)
        if self._finisher is None:
            self._close_fds()
        if not self.exited.done():
            self.exited.cancel()
