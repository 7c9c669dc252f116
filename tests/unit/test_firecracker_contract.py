"""Every request the Firecracker backend sends fits Firecracker's published API (v1.17 Swagger spec).

Bodies are captured by the test double (a real process on a real Unix socket) and validated here
against JSON Schema made from the spec's definitions, with unknown members forbidden as Firecracker's
serde structs do; each method + path must be one of the spec's paths.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from metald.backends.firecracker import FirecrackerBackend, snapshot
from metald.backends.firecracker.config import configure_calls, token_bucket
from metald.backends.firecracker.layout import Layout
from metald.domain.errors import ErrorCode, MetaldError
from metald.domain.model import RateLimit
from metald.ports import LaunchSpec, NicSpec
from tests.integration.firecracker_double import Contract, FakeFirecracker, closing_backends, launch_spec

MIB = 1024 * 1024
LIMIT = RateLimit(bandwidth_bytes_per_second=100 * MIB, burst_bytes=MIB, refill_time_millis=100)


@pytest.fixture(scope="module")
def contract() -> Contract:
    return Contract()


@pytest.fixture
def fake(tmp_path: Path) -> FakeFirecracker:
    return FakeFirecracker.install(tmp_path / "bin")


def make_backend(
    fake: FakeFirecracker, tmp_path: Path, *, machine: str = "x86_64", jailed: bool = False
) -> FirecrackerBackend:
    return fake.backend(tmp_path, jailed=jailed, machine=machine, reboot_timeout=5.0)


@pytest.fixture
async def backends(tmp_path: Path) -> AsyncIterator[list[FirecrackerBackend]]:
    """Backends made by a test; afterwards they are closed and every VMM left is killed."""
    async with closing_backends(tmp_path) as made:
        yield made


def rich_spec(root: Path, cpu_template: str = "T2") -> LaunchSpec:
    """Every field the reference allows: initrd, writable and read-only drives, several NICs with and
    without rate limits, a CPU template, customer kernel arguments."""
    return launch_spec(
        root,
        vcpus=2,
        memory_mib=256,
        cpu_template=cpu_template,
        initrd=True,
        disks=(("rootfs", False, True), ("data", False, False), ("seed", True, False)),
        nics=(
            NicSpec("eth0", "tap0", "02:00:00:00:00:01", LIMIT),
            NicSpec("eth1", "tap1", "02:00:00:00:00:02", RateLimit(bandwidth_bytes_per_second=250_000)),
            NicSpec("eth2", "tap2", "02:00:00:00:00:03"),
        ),
        kernel_args="console=ttyS0 quiet",
    )


def assert_fits(contract: Contract, fake: FakeFirecracker) -> list[dict[str, Any]]:
    requests = fake.requests()
    assert requests, "no request reached the double"
    for r in requests:
        assert contract.template(r["path"]) is not None, r
        assert contract.operation(r["method"], r["path"]) is not None, r
        assert contract.errors(r["method"], r["path"], r["body"]) == [], r
        assert r["status"] in (200, 204), r
    return requests


async def lifecycle(backend: FirecrackerBackend, spec: LaunchSpec) -> None:
    await backend.prepare(spec)
    await backend.start(spec)
    assert await backend.wait_ready(spec.vm_id, 10)
    await backend.pause(spec.vm_id)
    await backend.metrics(spec.vm_id)
    await backend.resume(spec.vm_id)
    await backend.reboot(spec.vm_id, force=False)
    await backend.reboot(spec.vm_id, force=True)
    await backend.pause(spec.vm_id)
    await backend.stop(spec.vm_id, graceful=True, timeout=5)
    await backend.destroy(spec.vm_id, spec.vm_dir)


# ---- the validator itself bites ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("PUT", "/machine-config", {"vcpu_count": 2}),  # mem_size_mib missing
        ("PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 128, "vcpus": 2}),  # unknown member
        ("PUT", "/machine-config", {"vcpu_count": 33, "mem_size_mib": 128}),  # over the maximum
        ("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128, "cpu_template": "T3"}),
        ("PUT", "/drives/rootfs", {"drive_id": "rootfs", "path_on_host": "/x"}),  # is_root_device missing
        (
            "PUT",
            "/network-interfaces/eth0",
            {"iface_id": "eth0", "host_dev_name": "tap0", "rx_rate_limiter": {"bandwidth": {"size": 1}}},
        ),
        ("PUT", "/actions", {"action_type": "Reboot"}),
        ("PATCH", "/vm", {"state": "Stopped"}),
        ("PUT", "/boot-source", None),  # body required
        ("POST", "/actions", {"action_type": "InstanceStart"}),  # no such operation
        ("PUT", "/nonexistent", {}),
        ("PUT", "/snapshot/create", {"snapshot_path": "/vmstate"}),  # mem_file_path missing
        ("PUT", "/snapshot/create", {"snapshot_path": "/s", "mem_file_path": "/m", "snapshot_type": "Live"}),
        ("PUT", "/snapshot/load", {"mem_backend": {"backend_type": "File", "backend_path": "/m"}}),
        ("PUT", "/snapshot/load", {"snapshot_path": "/s", "mem_backend": {"backend_type": "Memfd"}}),
        ("PUT", "/snapshot/load", {"snapshot_path": "/s", "network_overrides": [{"iface_id": "eth0"}]}),
        ("PUT", "/snapshot/load", {"snapshot_path": "/s", "resume": True}),  # unknown member
    ],
)
def test_contract_rejects_what_firecracker_rejects(
    contract: Contract, method: str, path: str, body: Any
) -> None:
    assert contract.errors(method, path, body)


def test_contract_accepts_the_spec_own_shapes(contract: Contract) -> None:
    assert contract.errors("PUT", "/drives/rootfs", {"drive_id": "rootfs", "is_root_device": True}) == []
    assert contract.errors("GET", "/", None) == []
    assert contract.template("/network-interfaces/eth0") == "/network-interfaces/{iface_id}"


# ---- the request bodies, pure ----------------------------------------------------------------


def test_snapshot_bodies_fit(contract: Contract, tmp_path: Path) -> None:
    """What snapshot.py sends for a jailed VM with NICs (the double checks them again when sent)."""
    spec = dataclasses.replace(rich_spec(tmp_path), restore_from=tmp_path / "snap")
    layout = Layout(spec.vm_dir, tmp_path / "jail" / "root")
    for call in (
        snapshot.PAUSE,
        snapshot.RESUME,
        snapshot.create_call(layout),
        snapshot.load_call(spec, layout),
    ):
        assert contract.errors(call.method, call.path, call.body) == [], call
    overrides = snapshot.load_call(spec, layout).body["network_overrides"]  # type: ignore[index]
    assert [o["host_dev_name"] for o in overrides] == ["tap0", "tap1", "tap2"]


def test_token_bucket_mapping() -> None:
    # 100 MiB/s refilled every 100 ms: 10 MiB per interval, plus 1 MiB once.
    assert token_bucket(LIMIT) == {"size": 10 * MIB, "refill_time": 100, "one_time_burst": MIB}
    # refill 0 would disable the bucket in Firecracker: one second instead.
    assert token_bucket(RateLimit(bandwidth_bytes_per_second=250_000)) == {
        "size": 250_000,
        "refill_time": 1000,
    }
    assert token_bucket(RateLimit(bandwidth_bytes_per_second=0, burst_bytes=5)) is None  # unlimited


@pytest.mark.parametrize(
    ("machine", "templates"), [("x86_64", ["T2", "T2S", "T2CL", "T2A"]), ("aarch64", ["V1N1"])]
)
def test_each_cpu_template_of_the_host_fits(
    contract: Contract, tmp_path: Path, machine: str, templates: list[str]
) -> None:
    backend = FirecrackerBackend(
        firecracker_binary="firecracker", chroot_base=tmp_path, vmm_uid=None, vmm_gid=None, machine=machine
    )
    assert sorted(backend.capabilities.cpu_templates) == sorted(templates)
    for template in ["", *templates]:
        spec = rich_spec(tmp_path, template)
        for jail in (None, tmp_path / "jail"):
            calls = configure_calls(spec, Layout(spec.vm_dir, jail), backend.capabilities.cpu_templates)
            for call in calls:
                assert contract.errors(call.method, call.path, call.body) == [], call
            machine_config = next(c.body for c in calls if c.path == "/machine-config")
            assert machine_config is not None and machine_config.get("cpu_template", "") == template


def test_templates_of_the_other_architecture_and_virtio_console_are_refused(tmp_path: Path) -> None:
    x86 = FirecrackerBackend(
        firecracker_binary="firecracker", chroot_base=tmp_path, vmm_uid=None, vmm_gid=None, machine="x86_64"
    )
    assert "V1N1" not in x86.capabilities.cpu_templates
    assert x86.capabilities.console_types == frozenset({"SERIAL"})
    spec = rich_spec(tmp_path, "V1N1")
    with pytest.raises(MetaldError) as err:
        configure_calls(spec, Layout(spec.vm_dir), x86.capabilities.cpu_templates)
    assert err.value.code is ErrorCode.INVALID_ARGUMENT
    virtio = launch_spec(tmp_path, console_type="VIRTIO_CONSOLE")
    with pytest.raises(MetaldError) as err:
        configure_calls(virtio, Layout(virtio.vm_dir), x86.capabilities.cpu_templates)
    assert err.value.metadata["field"] == "config.console.type"


# ---- the bodies really sent, through the double ----------------------------------------------


async def test_full_lifecycle_of_a_rich_vm_fits(
    contract: Contract, fake: FakeFirecracker, tmp_path: Path, backends: list[FirecrackerBackend]
) -> None:
    backend = make_backend(fake, tmp_path)
    backends.append(backend)
    await lifecycle(backend, rich_spec(tmp_path))
    requests = assert_fits(contract, fake)
    sent = {(r["method"], contract.template(r["path"])) for r in requests}
    assert sent >= {
        ("GET", "/"),
        ("PUT", "/logger"),
        ("PUT", "/metrics"),
        ("PUT", "/machine-config"),
        ("PUT", "/boot-source"),
        ("PUT", "/drives/{drive_id}"),
        ("PUT", "/network-interfaces/{iface_id}"),
        ("PUT", "/serial"),
        ("PUT", "/actions"),
        ("PATCH", "/vm"),
    }
    actions = {r["body"]["action_type"] for r in requests if r["path"] == "/actions"}
    assert actions == {"InstanceStart", "FlushMetrics", "SendCtrlAltDel"}
    nic = next(r["body"] for r in requests if r["path"] == "/network-interfaces/eth0")
    assert nic["rx_rate_limiter"] == nic["tx_rate_limiter"] == {"bandwidth": token_bucket(LIMIT)}
    drives = [r["body"] for r in requests if r["path"].startswith("/drives/")][:3]
    assert [d["drive_id"] for d in drives] == ["rootfs", "data", "seed"]
    assert [d["is_read_only"] for d in drives] == [False, False, True]


@pytest.mark.parametrize(
    ("machine", "template"), [("x86_64", "T2S"), ("x86_64", "T2CL"), ("x86_64", "T2A"), ("aarch64", "V1N1")]
)
async def test_each_template_boots_through_the_double(
    contract: Contract,
    fake: FakeFirecracker,
    tmp_path: Path,
    backends: list[FirecrackerBackend],
    machine: str,
    template: str,
) -> None:
    backend = make_backend(fake, tmp_path, machine=machine)
    backends.append(backend)
    spec = rich_spec(tmp_path, template)
    await backend.start(spec)
    await backend.stop(spec.vm_id, graceful=True, timeout=5)
    requests = assert_fits(contract, fake)
    assert any(
        r["body"] == {"vcpu_count": 2, "mem_size_mib": 256, "smt": False, "cpu_template": template}
        for r in requests
    )
    if machine == "aarch64":  # no SendCtrlAltDel on ARM: a graceful stop can only kill
        assert {"action_type": "SendCtrlAltDel"} not in [r["body"] for r in requests]


async def test_jailed_lifecycle_fits(
    contract: Contract, fake: FakeFirecracker, tmp_path: Path, backends: list[FirecrackerBackend]
) -> None:
    backend = make_backend(fake, tmp_path, jailed=True)
    backends.append(backend)
    await lifecycle(backend, rich_spec(tmp_path))
    requests = assert_fits(contract, fake)
    paths = [r["body"]["path_on_host"] for r in requests if r["path"].startswith("/drives/")]
    assert paths[:3] == ["/drive-rootfs.img", "/drive-data.img", "/drive-seed.img"]  # chroot-relative


async def test_a_body_the_double_refuses_surfaces_as_an_error(
    fake: FakeFirecracker, tmp_path: Path, backends: list[FirecrackerBackend]
) -> None:
    """The double really validates: 33 vCPUs break the schema (maximum 32) and the boot fails."""
    backend = make_backend(fake, tmp_path)
    backends.append(backend)
    spec = launch_spec(tmp_path, vcpus=33)
    with pytest.raises(MetaldError) as err:
        await backend.start(spec)
    assert err.value.code is ErrorCode.FAILED_PRECONDITION
    assert "vcpu_count" in err.value.message
    assert fake.requests()[-1]["status"] == 400
    assert await backend.runtime(spec.vm_id) is None
