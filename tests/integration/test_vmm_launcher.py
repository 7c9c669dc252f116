"""The C launcher (vmm/launch.c) under the real supervisor, with small commands as the VMM: the pid
it reports, an exec failure's text, the descriptors the VMM keeps, its cgroup join, the process
that ends as the supervisor, and a host without a compiler."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from metald.backends import procfs
from metald.backends.vmm import layout
from metald.backends.vmm.launcher import launcher
from metald.backends.vmm.process import VmmProcess, VmmStartError
from metald.domain.errors import MetaldError


async def test_the_vmm_runs_under_the_python_supervisor(tmp_path: Path) -> None:
    vmm = await VmmProcess.spawn(tmp_path, ["sleep", "30"])
    try:
        assert procfs.read_cmdline(vmm.pid) == ["sleep", "30"]
        supervisor = procfs.read_cmdline(vmm.ident.supervisor_pid)
        assert supervisor[1:4] == ["-S", "-m", "metald.backends.vmm.supervisor"], supervisor
        assert f"--vm-dir={tmp_path}" in supervisor
        assert os.getsid(vmm.ident.supervisor_pid) == vmm.ident.supervisor_pid, "its own session"
        stat = await asyncio.to_thread(Path(f"/proc/{vmm.pid}/stat").read_text)
        assert int(stat.rsplit(")", 1)[1].split()[1]) == vmm.ident.supervisor_pid, "its parent"
    finally:
        vmm.kill()
    assert (await vmm.exited).returncode == -9


async def test_an_exec_failure_is_reported_with_its_text(tmp_path: Path) -> None:
    with pytest.raises(VmmStartError, match="cannot exec /nonexistent/vmm: No such file or directory"):
        await VmmProcess.spawn(tmp_path, ["/nonexistent/vmm"])


async def test_the_vmm_keeps_only_its_descriptors(tmp_path: Path) -> None:
    kept_read, kept = os.pipe()
    other_read, other = os.pipe()  # inheritable in the daemon, not passed: closed for the VMM
    os.set_inheritable(other, True)
    try:
        vmm = await VmmProcess.spawn(tmp_path, ["sleep", "30"], pass_fds=[kept])
    finally:
        for fd in (kept_read, kept, other_read, other):
            os.close(fd)
    try:  # the supervisor answers once the exec closed the report pipe: these are the VMM's own
        assert sorted(int(fd) for fd in os.listdir(f"/proc/{vmm.pid}/fd")) == [0, 1, 2, kept]
        assert os.readlink(f"/proc/{vmm.pid}/fd/0") == os.devnull
        assert os.readlink(f"/proc/{vmm.pid}/fd/1") == str(tmp_path / layout.VMM_LOG)
    finally:
        vmm.kill()
    await vmm.exited


async def test_the_vmm_joins_its_cgroup_before_its_exec(tmp_path: Path) -> None:
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    (cgroup / "cgroup.procs").write_text("")  # a plain file: the pid the VMM wrote into it
    vm_dir = tmp_path / "vm"
    vm_dir.mkdir()
    vmm = await VmmProcess.spawn(vm_dir, ["sleep", "30"], cgroup=[cgroup])
    try:
        assert (cgroup / "cgroup.procs").read_text() == str(vmm.pid)
    finally:
        vmm.kill()
    await vmm.exited


async def test_a_missing_compiler_is_a_missing_host_tool(tmp_path: Path) -> None:
    with pytest.raises(MetaldError) as caught:
        await launcher(tmp_path, compiler="/nonexistent/gcc")
    assert caught.value.reason == "HOST_TOOL_MISSING" and "/nonexistent/gcc" in str(caught.value)


async def test_the_launcher_is_built_once_per_source(tmp_path: Path) -> None:
    built = await launcher(tmp_path)
    assert built.parent == tmp_path and os.access(built, os.X_OK)
    assert os.listdir(tmp_path) == [built.name], "no temporary left"
