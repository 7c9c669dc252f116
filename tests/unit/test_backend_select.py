"""backend = qemu | firecracker | auto, and the KVM probe behind auto."""

from __future__ import annotations

from pathlib import Path

import pytest

from metald.backends.select import choose_backend_type, kvm_usable


class Probe:
    def __init__(self, result: bool) -> None:
        self.result = result
        self.calls = 0

    async def __call__(self) -> bool:
        self.calls += 1
        return self.result


@pytest.fixture
def binary(tmp_path: Path) -> str:
    path = tmp_path / "firecracker"
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return str(path)


async def test_auto_picks_firecracker_only_with_binary_and_kvm(binary: str, tmp_path: Path) -> None:
    assert await choose_backend_type("auto", binary, Probe(True)) == "firecracker"
    assert await choose_backend_type("auto", binary, Probe(False)) == "qemu"
    no_kvm_asked = Probe(True)
    assert await choose_backend_type("auto", str(tmp_path / "missing"), no_kvm_asked) == "qemu"
    assert no_kvm_asked.calls == 0


async def test_a_binary_that_is_not_executable_does_not_count(tmp_path: Path) -> None:
    path = tmp_path / "firecracker"
    path.write_text("")
    assert await choose_backend_type("auto", str(path), Probe(True)) == "qemu"


async def test_explicit_choice_is_kept(tmp_path: Path) -> None:
    probe = Probe(False)
    assert await choose_backend_type("firecracker", str(tmp_path / "missing"), probe) == "firecracker"
    assert await choose_backend_type("qemu", "firecracker", probe) == "qemu"
    assert probe.calls == 0
    with pytest.raises(ValueError):
        await choose_backend_type("xen", "firecracker", probe)


async def test_kvm_probe_refuses_what_is_not_kvm(tmp_path: Path) -> None:
    assert await kvm_usable(str(tmp_path / "missing")) is False
    assert await kvm_usable("/dev/null") is False  # opens, but KVM_GET_API_VERSION fails (ENOTTY)
    regular = tmp_path / "kvm"
    regular.write_text("")
    assert await kvm_usable(str(regular)) is False
