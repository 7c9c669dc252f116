"""The service in process: a real store on a temp file, the fakes of metald.testing for the
backend and the network. No root, no QEMU, no daemon."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from metald.assets import AssetResolver
from metald.domain.errors import ErrorCode, MetaldError
from metald.domain.events import VmEvent, VmEventType
from metald.domain.model import NetworkInterface, Vm, VmConfig
from metald.domain.paging import PageTokens
from metald.domain.quotas import Quotas
from metald.domain.states import VmState
from metald.domain.validation import Defaults, Limits
from metald.ports import EventRetention
from metald.service import ServiceOptions, ServicePorts, VmService
from metald.store.sqlite import SqliteStore
from metald.testing import FakeBackend, FakeNetwork, RecordingEvents

CUSTOMER = "acme"
NIC = VmConfig(network=(NetworkInterface(interface_id="eth0"),))
NAMESPACE_GONE = MetaldError(
    ErrorCode.INTERNAL,
    "network command failed (255): ip -n ns_vm link del vh_x: Cannot open network namespace",
    reason="NETWORK_COMMAND_FAILED",
)


@dataclasses.dataclass
class World:
    tmp: Path
    store: SqliteStore
    backend: FakeBackend
    network: FakeNetwork
    events: RecordingEvents
    quotas: Quotas
    service: VmService
    max_snapshots: int = 3

    def make_service(self) -> VmService:
        assets = self.tmp / "assets"
        return VmService(
            ports=ServicePorts(
                store=self.store.vms,
                event_log=self.store.events,
                backend=self.backend,
                network=self.network,
                assets=AssetResolver(assets),
                page_tokens=PageTokens(b"k" * 32),
                events=self.events,
                options=ServiceOptions(
                    vms_dir=self.tmp / "vms",
                    limits=Limits(),
                    defaults=Defaults(),
                    quotas=self.quotas,
                    shutdown_timeout=5,
                    boot_wait_timeout=5,
                    snapshots_dir=self.tmp / "snapshots",
                    max_snapshots_per_customer=self.max_snapshots,
                    max_warm_pool_size=2,
                ),
                snapshots=self.store.snapshots,
            )
        )

    async def restart(self, *, host_reboot: bool = False) -> VmService:
        """A new daemon on the same store (and, unless the host rebooted, the same VMMs)."""
        if host_reboot:
            self.backend.host_reboot()
            self.network.host_reboot()
        self.service = self.make_service()
        await self.service.recover()
        return self.service

    async def close(self) -> None:
        for task in list(self.service._background):
            task.cancel()
        await self.store.close()

    async def settle(self) -> None:
        """Let background work (exit notices, guest-ready notes) finish."""
        for _ in range(200):
            pending = [*self.service._background, *self.backend._notices]
            if not pending:
                return
            await asyncio.wait(pending, timeout=0.01)

    async def vm(self, vm_id: str) -> Vm | None:
        return await self.store.vms.get(vm_id)

    async def events_of(self, vm_id: str) -> list[VmEvent]:
        events = await self.store.events.events_after(CUSTOMER, 0, 10_000)
        return [e for e in events if e.vm_id == vm_id]

    async def last_event(self, vm_id: str) -> tuple[VmEventType, VmState, VmState, str]:
        """What the VM's newest event says: (type, state, previous_state, reason)."""
        event = (await self.events_of(vm_id))[-1]
        return event.type, event.state, event.previous_state, event.reason

    async def create(self, vm_id: str, config: VmConfig | None = None, customer: str = CUSTOMER) -> Vm:
        return await self.service.create(customer, vm_id, config or VmConfig(), "")

    async def boot(self, vm_id: str, **kw: Any) -> Vm:
        kw.setdefault("wait_for_ready", False)
        kw.setdefault("wait_timeout", 0)
        return await self.service.boot(CUSTOMER, vm_id, **kw)


async def open_world(tmp: Path, quotas: Quotas | None = None, retention: int = 100_000) -> World:
    assets = tmp / "assets"
    assets.mkdir(parents=True, exist_ok=True)
    for name in ("vmlinux", "initrd", "rootfs.ext4"):
        (assets / name).write_bytes(
            b"\x7fELF fake kernel" if name == "vmlinux" else b"x"
        )  # a kernel's header
    store = await SqliteStore.open(tmp / "metald.db", EventRetention(count=retention))
    world = World(tmp, store, FakeBackend(), FakeNetwork(), RecordingEvents(), quotas or Quotas(), None)  # type: ignore[arg-type]
    world.service = world.make_service()
    await world.service.recover()
    return world


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    w = await open_world(tmp_path)
    yield w
    await w.close()


def code_of(exc: pytest.ExceptionInfo[MetaldError]) -> tuple[ErrorCode, str]:
    return exc.value.code, exc.value.reason
