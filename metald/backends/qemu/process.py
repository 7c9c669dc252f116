"""A QEMU process under its supervisor: spawn or re-attach, signal it, learn of its end without polling.

The end is seen through a pidfd on the supervisor, which exits right after reaping QEMU and writing
exit.json; QEMU itself is signalled through its own pidfd, so a recycled pid is never hit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import metald
from metald.backends import procfs
from metald.backends.qemu import cmdline, layout

_SUPERVISOR_MODULE = "metald.backends.qemu.supervisor"
_PACKAGE_ROOT = str(Path(metald.__file__).resolve().parent.parent)


class VmmStartError(Exception):
    """QEMU (or its supervisor) ended before it was up; the message ends with its log."""


@dataclass(frozen=True)
class VmmIdentity:
    pid: int
    start_time: int
    supervisor_pid: int
    supervisor_start_time: int


def read_log_tail(vm_dir: Path, since: int = 0, limit: int = 2000) -> str:
    """The end of vmm.log written after offset `since` (the log is appended to at every start)."""
    try:
        with open(vm_dir / layout.VMM_LOG, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(since, f.tell() - limit))
            return f.read().decode(errors="replace").strip()
    except FileNotFoundError:
        return ""


def _read_json(path: Path) -> dict[str, int] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _read_identity(vm_dir: Path) -> VmmIdentity | None:
    data = _read_json(vm_dir / layout.VMM_STATE)
    try:
        return VmmIdentity(**{k: int(data[k]) for k in VmmIdentity.__dataclass_fields__}) if data else None
    except (KeyError, TypeError, ValueError):
        return None


def _is_vms_qemu(pid: int, vm_dir: Path, vm_id: str) -> bool:
    """The pid runs QEMU named after vm_id in vm_dir (not a recycled pid running something else)."""
    return cmdline.name_matches(procfs.read_cmdline(pid), vm_id) and os.path.realpath(
        procfs.read_cwd(pid)
    ) == os.path.realpath(vm_dir)


def remove_runtime_files(vm_dir: Path) -> None:
    for name in layout.RUNTIME_FILES:
        with contextlib.suppress(FileNotFoundError):
            (vm_dir / name).unlink()


class VmmProcess:
    def __init__(self, vm_dir: Path, ident: VmmIdentity, qemu_fd: int, supervisor_fd: int) -> None:
        self.vm_dir = vm_dir
        self.ident = ident
        self._qemu_fd = qemu_fd
        self._supervisor_fd = supervisor_fd
        self._child: asyncio.subprocess.Process | None = None
        self.log_offset = 0  # where this run's part of vmm.log begins
        self._loop = asyncio.get_running_loop()
        # QEMU's return code once it has ended (negative = signal; None = unknown, supervisor gone).
        self.exited: asyncio.Future[int | None] = self._loop.create_future()
        self._finisher: asyncio.Task[None] | None = None
        self._loop.add_reader(supervisor_fd, self._on_supervisor_exit)

    @property
    def pid(self) -> int:
        return self.ident.pid

    @property
    def running(self) -> bool:
        return not self.exited.done()

    @classmethod
    async def spawn(cls, vm_dir: Path, argv: list[str], *, timeout: float = 10.0) -> VmmProcess:
        """Start the supervisor (own session: it outlives the daemon) and, through it, QEMU."""
        await asyncio.to_thread(remove_runtime_files, vm_dir)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PACKAGE_ROOT, env.get("PYTHONPATH")]))
        log_fd = os.open(vm_dir / layout.VMM_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        log_offset = os.fstat(log_fd).st_size
        try:
            child = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                _SUPERVISOR_MODULE,
                *argv,
                cwd=vm_dir,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=log_fd,
                start_new_session=True,
            )
        finally:
            os.close(log_fd)
        try:
            return await cls._await_start(vm_dir, child, timeout, log_offset)
        except BaseException:  # failed or cancelled: leave nothing running
            with contextlib.suppress(ProcessLookupError):
                child.kill()  # QEMU follows through its parent-death signal
            await child.wait()
            raise

    @classmethod
    async def _await_start(
        cls, vm_dir: Path, child: asyncio.subprocess.Process, timeout: float, log_offset: int
    ) -> VmmProcess:
        assert child.stdout is not None
        try:
            line = await asyncio.wait_for(child.stdout.readline(), timeout)
        except TimeoutError:
            line = b""
        ident = await asyncio.to_thread(_read_identity, vm_dir) if line.strip() else None
        vmm = cls._open(vm_dir, ident) if ident is not None else None
        if vmm is None:
            tail = await asyncio.to_thread(read_log_tail, vm_dir, log_offset)
            raise VmmStartError(f"QEMU did not start or exited at once: {tail}")
        vmm._child = child
        vmm.log_offset = log_offset
        return vmm

    @classmethod
    async def attach(cls, vm_dir: Path, vm_id: str) -> VmmProcess | None:
        """Re-attach to the VMM recorded in vm_dir if it is still that VM's live QEMU, else None."""
        ident = await asyncio.to_thread(_read_identity, vm_dir)
        if ident is None:
            return None
        vmm = cls._open(vm_dir, ident)
        if vmm is not None and not await asyncio.to_thread(_is_vms_qemu, ident.pid, vm_dir, vm_id):
            vmm.detach()
            return None
        return vmm

    @classmethod
    def _open(cls, vm_dir: Path, ident: VmmIdentity) -> VmmProcess | None:
        """Pidfds on QEMU and its supervisor, opened first and then checked: no pid-reuse window."""
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
        data = await asyncio.to_thread(_read_json, self.vm_dir / layout.EXIT_STATE)
        returncode = data.get("returncode") if data else None
        if returncode is None:  # supervisor killed: make sure QEMU follows (it has a parent-death signal)
            self.kill()
        if self._child is not None:
            await self._child.wait()
        self._close_fds()
        if not self.exited.done():
            self.exited.set_result(returncode)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError, OSError):
            signal.pidfd_send_signal(self._qemu_fd, sig)

    def _close_fds(self) -> None:
        for fd in (self._qemu_fd, self._supervisor_fd):
            if fd >= 0:
                os.close(fd)
        self._qemu_fd = self._supervisor_fd = -1

    def detach(self) -> None:
        """Stop watching without touching the VMM (daemon shutdown)."""
        if self._supervisor_fd >= 0 and self._finisher is None:
            self._loop.remove_reader(self._supervisor_fd)
        if self._finisher is None:
            self._close_fds()
        if not self.exited.done():
            self.exited.cancel()
