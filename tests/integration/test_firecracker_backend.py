"""The Firecracker backend against the Firecracker test double: exact API call sequences for every
lifecycle operation, process handling (graceful timeout then kill, unexpected exits, re-adoption
after a daemon restart) and the jailed layout. The double is a real process under the real
supervisor, so pids, signals and exit detection are exercised."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest

from metald.backends import procfs
from metald.backends.firecracker import FirecrackerBackend
from metald.domain.errors import ErrorCode, MetaldError
from metald.ports import LaunchSpec
from tests.integration.firecracker_double import FLUSH_DELTAS, FakeFirecracker, closing_backends, launch_spec

BOOT = [
    ("GET", "/"),
    ("PUT", "/logger"),
    ("PUT", "/metrics"),
    ("PUT", "/machine-config"),
    ("PUT", "/boot-source"),
    ("PUT", "/drives/rootfs"),
    ("PUT", "/serial"),
    ("PUT", "/actions"),
]
CTRL_ALT_DEL = ("PUT", "/actions")
NewBackend = Callable[..., FirecrackerBackend]


class Exits:
    """An exit listener that remembers what it was told."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []
        self.event = asyncio.Event()

    async def __call__(self, vm_id: str, reason: str) -> None:
        self.seen.append((vm_id, reason))
        self.event.set()


@pytest.fixture
def fake(tmp_path: Path) -> FakeFirecracker:
    return FakeFirecracker.install(tmp_path / "bin")


@pytest.fixture
async def made(tmp_path: Path) -> AsyncIterator[list[FirecrackerBackend]]:
    """Backends a test made; afterwards they are closed and every VMM left under tmp_path is killed."""
    async with closing_backends(tmp_path) as backends:
        yield backends


@pytest.fixture
def new_backend(fake: FakeFirecracker, tmp_path: Path, made: list[FirecrackerBackend]) -> NewBackend:
    def make(*, jailed: bool = False, exits: Exits | None = None) -> FirecrackerBackend:
        backend = fake.backend(tmp_path, jailed=jailed, reboot_timeout=0.5)
        if exits is not None:
            backend.set_exit_listener(exits)
        made.append(backend)
        return backend

    return make


def gone(pid: int, start_time: int) -> bool:
    return not procfs.is_live(pid, start_time)


def identity(pid: int) -> int:
    stat = procfs.read_stat(pid)
    assert stat is not None
    return stat.start_time


async def booted(backend: FirecrackerBackend, spec: LaunchSpec) -> int:
    await backend.prepare(spec)
    runtime = await backend.start(spec)
    assert await backend.wait_ready(spec.vm_id, 10)
    return runtime.pid


async def test_boot_sequence_and_files(
    new_backend: NewBackend, fake: FakeFirecracker, tmp_path: Path
) -> None:
    backend = new_backend()
    spec = launch_spec(tmp_path)
    runtime = await backend.start(spec)
    assert fake.calls() == BOOT
    requests = fake.requests()
    assert requests[-1]["body"] == {"action_type": "InstanceStart"}
    assert requests[4]["body"]["boot_args"] == "console=ttyS0 reboot=k panic=1 metald.vm_id=vm_test-1"
    assert requests[5]["body"]["path_on_host"] == str(spec.vm_dir / "drive-rootfs.img")  # per-VM copy
    assert requests[6]["body"] == {"serial_out_path": str(spec.console_path)}
    assert runtime.socket_path == str(spec.vm_dir / "fc.sock")
    assert runtime.extra["firecracker_id"] != spec.vm_id  # "_" is not allowed in Firecracker ids
    # The sparse per-VM copy of the writable root is there, holes kept.
    copy = spec.vm_dir / "drive-rootfs.img"
    assert copy.read_bytes()[:10] == b"superblock" and copy.stat().st_blocks * 512 < 4 << 20
    assert runtime.guest_ready is False
    assert await backend.wait_ready(spec.vm_id, 10)
    assert (await backend.runtime(spec.vm_id)) is not None
    # Detached from the daemon: the supervisor has its own session.
    state = (spec.vm_dir / "vmm.json").read_text()
    assert str(runtime.pid) in state
    assert os.getsid(runtime.pid) != os.getsid(0)


async def test_pause_resume(new_backend: NewBackend, fake: FakeFirecracker, tmp_path: Path) -> None:
    backend = new_backend()
    spec = launch_spec(tmp_path)
    await booted(backend, spec)
    fake.clear()
    await backend.pause(spec.vm_id)
    runtime = await backend.runtime(spec.vm_id)
    assert runtime is not None and runtime.paused
    await backend.resume(spec.vm_id)
    assert [(r["method"], r["path"], r["body"]) for r in fake.requests()] == [
        ("PATCH", "/vm", {"state": "Paused"}),
        ("PATCH", "/vm", {"state": "Resumed"}),
    ]
    runtime = await backend.runtime(spec.vm_id)
    assert runtime is not None and not runtime.paused


async def test_graceful_shutdown(new_backend: NewBackend, fake: FakeFirecracker, tmp_path: Path) -> None:
    exits = Exits()
    backend = new_backend(exits=exits)
    spec = launch_spec(tmp_path)
    pid = await booted(backend, spec)
    start = identity(pid)
    fake.clear()
    assert await backend.stop(spec.vm_id, graceful=True, timeout=5) == "guest_poweroff"
    assert fake.calls() == [CTRL_ALT_DEL]
    assert fake.requests()[0]["body"] == {"action_type": "SendCtrlAltDel"}
    assert gone(pid, start)
    assert await backend.runtime(spec.vm_id) is None
    assert await backend.stop(spec.vm_id, graceful=True, timeout=5) == "not_running"  # idempotent
    assert exits.seen == []


async def test_graceful_timeout_then_kill(
    new_backend: NewBackend, fake: FakeFirecracker, tmp_path: Path
) -> None:
    exits = Exits()
    backend = new_backend(exits=exits)
    fake.behave(ignore_ctrl_alt_del=True)
    spec = launch_spec(tmp_path)
    pid = await booted(backend, spec)
    start = identity(pid)
    fake.clear()
    began = time.monotonic()
    assert await backend.stop(spec.vm_id, graceful=True, timeout=0.5) == "killed"
    assert time.monotonic() - began >= 0.5
    assert fake.calls() == [CTRL_ALT_DEL]
    assert gone(pid, start)
    assert exits.seen == []


async def test_shutdown_of_a_paused_vm_resumes_it_first(
    new_backend: NewBackend, fake: FakeFirecracker, tmp_path: Path
) -> None:
    backend = new_backend()
    spec = launch_spec(tmp_path)
    await booted(backend, spec)
    await backend.pause(spec.vm_id)
    fake.clear()
    assert await backend.stop(spec.vm_id, graceful=True, timeout=5) == "guest_poweroff"
    assert [r["body"] for r in fake.requests()] == [{"state": "Resumed"}, {"action_type": "SendCtrlAltDel"}]


async def test_forced_shutdown_sends_nothing(
    new_backend: NewBackend, fake: FakeFirecracker, tmp_path: Path
) -> None:
    backend = new_backend()
    spec = launch_spec(tmp_path)
    pid = await booted(backend, spec)
    start = identity(pid)
    fake.clear()
    assert await backend.stop(spec.vm_id, graceful=False, timeout=5) == "killed"
    assert fake.calls() == []
    assert gone(pid, start)


@pytest.mark.parametrize("force", [False, True])
async def test_reboot_is_a_new_process_with_the_same_config(
    new_backend: NewBackend, fake: FakeFirecracker, tmp_path: Path, force: bool
) -> None:
    exits = Exits()
    backend = new_backend(exits=exits)
    spec = launch_spec(tmp_path)
    pid = await booted(backend, spec)
    start = identity(pid)
    first_boot = [r["body"] for r in fake.requests()]
    fake.clear()
    await backend.reboot(spec.vm_id, force=force)
    assert fake.calls() == ([] if force else [CTRL_ALT_DEL]) + BOOT
    assert [r["body"] for r in fake.requests()][-len(BOOT) :] == first_boot
    runtime = await backend.runtime(spec.vm_id)
    assert runtime is not None and runtime.pid != pid and gone(pid, start)
    assert await backend.wait_ready(spec.vm_id, 10)
    # The console holds this boot only: the old ready line was not taken for the new one.
    assert spec.console_path.read_text().count("METALD_READY") == 1
    assert exits.seen == []


async def test_reboot_of_a_guest_ignoring_ctrl_alt_del_kills_after_the_timeout(
    new_backend: NewBackend, fake: FakeFirecracker, tmp_path: Path
) -> None:
    backend = new_backend()
    fake.behave(ignore_ctrl_alt_del=True)
    spec = launch_spec(tmp_path)
    await booted(backend, spec)
    fake.clear()
    await backend.reboot(spec.vm_id, force=False)
    assert fake.calls() == [CTRL_ALT_DEL, *BOOT]


async def test_delete(new_backend: NewBackend, fake: FakeFirecracker, tmp_path: Path) -> None:
    backend = new_backend()
    spec = launch_spec(tmp_path)
    pid = await booted(backend, spec)
    start = identity(pid)
    fake.clear()
    await backend.destroy(spec.vm_id, spec.vm_dir)
    assert fake.calls() == []
    assert gone(pid, start)
    assert not spec.vm_dir.exists()
    assert (tmp_path / "assets" / "rootfs.img").exists()  # the shared image is untouched
    await backend.destroy(spec.vm_id, spec.vm_dir)  # idempotent


async def test_unexpected_exits_reach_the_listener(
    new_backend: NewBackend, fake: FakeFirecracker, tmp_path: Path
) -> None:
    exits = Exits()
    backend = new_backend(exits=exits)
    spec = launch_spec(tmp_path)
    pid = await booted(backend, spec)
    os.kill(pid, signal.SIGKILL)
    await asyncio.wait_for(exits.event.wait(), 10)
    assert exits.seen == [(spec.vm_id, "vmm_crashed")]
    assert await backend.runtime(spec.vm_id) is None

    # A guest that reboots by itself ends Firecracker with status 0 (reboot=k).
    exits.event.clear()
    runtime = await backend.start(spec)
    transport = httpx.AsyncHTTPTransport(uds=runtime.socket_path)
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        await client.put("/actions", json={"action_type": "SendCtrlAltDel"})
    await asyncio.wait_for(exits.event.wait(), 10)
    assert exits.seen[-1] == (spec.vm_id, "guest_poweroff")


async def test_readoption_after_a_daemon_restart(
    new_backend: NewBackend, fake: FakeFirecracker, tmp_path: Path
) -> None:
    first = new_backend()
    spec = launch_spec(tmp_path)
    pid = await booted(first, spec)
    await first.pause(spec.vm_id)
    await first.close()  # the daemon goes away; the VM does not
    assert procfs.is_live(pid, identity(pid))

    exits = Exits()
    second = new_backend(exits=exits)
    fake.clear()
    runtime = await second.adopt(spec)
    assert runtime is not None
    assert (runtime.pid, runtime.paused, runtime.guest_ready) == (pid, True, True)
    assert fake.calls() == [("GET", "/")]
    await second.resume(spec.vm_id)
    assert (await second.metrics(spec.vm_id)).cpu_time_nanos > 0
    os.kill(pid, signal.SIGKILL)  # its end is seen by the new daemon too
    await asyncio.wait_for(exits.event.wait(), 10)
    assert exits.seen == [(spec.vm_id, "vmm_crashed")]
    assert await second.adopt(spec) is None


async def test_adopt_refuses_a_process_that_is_not_this_vms_firecracker(
    new_backend: NewBackend, tmp_path: Path
) -> None:
    backend = new_backend()
    spec = launch_spec(tmp_path)
    spec.vm_dir.mkdir(parents=True)
    me = os.getpid()
    fake_state = {
        "pid": me,
        "start_time": identity(me),
        "supervisor_pid": me,
        "supervisor_start_time": identity(me),
    }
    (spec.vm_dir / "vmm.json").write_text(str(fake_state).replace("'", '"'))
    assert await backend.adopt(spec) is None  # alive, but its command line is not Firecracker --id ...
    assert procfs.is_live(me, identity(me))


async def test_metrics_add_up_flushes_and_proc(new_backend: NewBackend, tmp_path: Path) -> None:
    backend = new_backend()
    spec = launch_spec(tmp_path)
    await booted(backend, spec)
    await backend.metrics(spec.vm_id)
    metrics = await backend.metrics(spec.vm_id)
    assert metrics.disk_read_bytes == 2 * FLUSH_DELTAS["block"]["read_bytes"]
    assert metrics.disk_write_bytes == 2 * FLUSH_DELTAS["block"]["write_bytes"]
    assert metrics.network_rx_bytes == 2 * FLUSH_DELTAS["net"]["rx_bytes_count"]
    assert metrics.network_tx_bytes == 2 * FLUSH_DELTAS["net"]["tx_bytes_count"]
    assert metrics.cpu_time_nanos > 0 and metrics.memory_usage_bytes > 0


async def test_jailed_vm(new_backend: NewBackend, fake: FakeFirecracker, tmp_path: Path) -> None:
    backend = new_backend(jailed=True)
    spec = launch_spec(tmp_path, initrd=True, disks=(("rootfs", False, True), ("seed", True, False)))
    pid = await booted(backend, spec)
    start = identity(pid)
    started = fake.records()[0]
    argv = started["argv"]
    fc_id = argv[argv.index("--id") + 1]
    root = tmp_path / "jail" / "firecracker" / fc_id / "root"
    assert started["cwd"] == str(root)
    assert argv[argv.index("--chroot-base-dir") + 1] == str(tmp_path / "jail")
    assert argv[argv.index("--uid") + 1] == str(os.getuid())
    assert argv[argv.index("--") :] == ["--", "--api-sock", "/fc.sock"]
    bodies = {r["path"]: r["body"] for r in fake.requests()}
    assert bodies["/boot-source"]["kernel_image_path"] == "/vmlinux"
    assert bodies["/boot-source"]["initrd_path"] == "/initrd"
    assert bodies["/drives/rootfs"]["path_on_host"] == "/drive-rootfs.img"
    assert bodies["/drives/seed"]["path_on_host"] == "/drive-seed.img"
    assert bodies["/serial"] == {"serial_out_path": "/console.log"}
    # Read-only files are hard links to the shared ones; the console is reachable from vm_dir.
    assert (root / "drive-seed.img").stat().st_ino == (tmp_path / "assets" / "seed.img").stat().st_ino
    assert spec.console_path.resolve() == root / "console.log"
    await backend.destroy(spec.vm_id, spec.vm_dir)
    assert gone(pid, start)
    assert not root.parent.exists() and not spec.vm_dir.exists()


async def test_a_vm_dir_longer_than_a_socket_path(
    new_backend: NewBackend, fake: FakeFirecracker, tmp_path: Path
) -> None:
    backend = new_backend()
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    spec = launch_spec(deep)
    assert len(str(spec.vm_dir / "fc.sock")) > 108
    await booted(backend, spec)
    await backend.pause(spec.vm_id)
    assert ("PATCH", "/vm") in fake.calls()


async def test_start_failures_are_reported_and_leave_nothing(
    new_backend: NewBackend, fake: FakeFirecracker, tmp_path: Path
) -> None:
    backend = new_backend()
    spec = launch_spec(tmp_path)
    await backend.prepare(spec)
    spec.kernel.unlink()  # Firecracker refuses a boot source it cannot open
    with pytest.raises(MetaldError) as err:
        await backend.start(spec)
    assert err.value.code is ErrorCode.FAILED_PRECONDITION
    assert "kernel_image_path" in err.value.message
    pid = fake.records()[0]["pid"]
    await asyncio.sleep(0.1)
    assert procfs.read_stat(pid) is None or procfs.read_stat(pid).state == "Z"  # type: ignore[union-attr]
    assert await backend.runtime(spec.vm_id) is None

    broken = FirecrackerBackend(
        firecracker_binary="/bin/false", chroot_base=tmp_path, vmm_uid=None, vmm_gid=None, start_timeout=2
    )
    with pytest.raises(MetaldError) as err:
        await broken.start(launch_spec(tmp_path, "vm-other"))
    assert err.value.reason in ("VMM_START_FAILED", "VMM_UNREACHABLE")


async def test_ping(fake: FakeFirecracker, tmp_path: Path) -> None:
    healthy = FirecrackerBackend(
        firecracker_binary=str(fake.binary),
        jailer_binary=str(fake.jailer),
        chroot_base=tmp_path,
        vmm_uid=None,
        vmm_gid=None,
    )
    result = await healthy.ping()
    assert result.status == "healthy" and "v1.17.0" in result.detail
    missing = FirecrackerBackend(
        firecracker_binary=str(tmp_path / "nope"), chroot_base=tmp_path, vmm_uid=None, vmm_gid=None
    )
    assert (await missing.ping()).status == "unhealthy"
    failing = FirecrackerBackend(
        firecracker_binary="/bin/false", chroot_base=tmp_path, vmm_uid=None, vmm_gid=None
    )
    assert (await failing.ping()).status == "unhealthy"
