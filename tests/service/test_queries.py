"""Reads in process: GetVmInfo answers what is known while a VM changes state, never an error."""

from __future__ import annotations

import asyncio

import pytest

from metald.domain.errors import ErrorCode, MetaldError
from metald.domain.states import VmState
from tests.service.conftest import CUSTOMER, NAMESPACE_GONE, NIC, World


async def test_info_of_a_running_vm(world: World) -> None:
    await world.create("vm-a", NIC)
    await world.boot("vm-a")
    world.network.counters_by_vm["vm-a"] = (10, 20)
    details = await world.service.info(CUSTOMER, "vm-a")
    assert details.runtime is not None and details.network is not None
    assert (details.metrics.network_rx_bytes, details.metrics.network_tx_bytes) == (10, 20)
    assert details.metrics.cpu_time_nanos > 0


@pytest.mark.parametrize(
    ("fakes", "step"),
    [("backend", "runtime"), ("backend", "metrics"), ("network", "describe")],
)
async def test_info_answers_what_is_known_when_a_read_fails(world: World, fakes: str, step: str) -> None:
    """Issue 11: `ip -n ns_vm… link show: Cannot open network namespace` while a VM is being shut
    down must not turn GetVmInfo into INTERNAL."""
    await world.create("vm-a", NIC)
    await world.boot("vm-a")
    getattr(world, fakes).faults.fail(step, NAMESPACE_GONE, times=0)
    details = await world.service.info(CUSTOMER, "vm-a")
    assert details.vm.state is VmState.RUNNING


async def test_info_during_a_storm_of_state_changes(world: World) -> None:
    await world.create("vm-a", NIC)
    await world.boot("vm-a")

    async def storm() -> None:
        for _ in range(20):
            for op in ("pause", "resume", "reboot"):
                await getattr(world.service, op)(
                    CUSTOMER, "vm-a", **({"force": True} if op == "reboot" else {})
                )
            await world.service.shutdown(CUSTOMER, "vm-a", force=True, timeout_seconds=0)
            await world.boot("vm-a")

    async def reads() -> int:
        n = 0
        while not done.is_set():
            await world.service.info(CUSTOMER, "vm-a")  # raises on any error
            n += 1
            await asyncio.sleep(0)
        return n

    done = asyncio.Event()
    reader = asyncio.create_task(reads())
    await storm()
    done.set()
    assert await reader > 0


async def test_list_pages_and_filters(world: World) -> None:
    for i in range(5):
        await world.create(f"vm-{i}")
    await world.boot("vm-2")
    first = await world.service.list(CUSTOMER, [], 2, "")
    assert [v.vm_id for v in first.vms] == ["vm-0", "vm-1"] and first.total_count == 5
    second = await world.service.list(CUSTOMER, [], 2, first.next_page_token)
    assert [v.vm_id for v in second.vms] == ["vm-2", "vm-3"]
    running = await world.service.list(CUSTOMER, [VmState.RUNNING], 0, "")
    assert [v.vm_id for v in running.vms] == ["vm-2"]
    with pytest.raises(MetaldError) as exc:
        await world.service.list(CUSTOMER, [VmState.UNSPECIFIED], 0, "")
    assert exc.value.code is ErrorCode.INVALID_ARGUMENT


async def test_console_of_a_vm(world: World) -> None:
    await world.create("vm-a")
    assert (await world.service.read_console(CUSTOMER, "vm-a", 0, 100)).data == b""
    (world.tmp / "vms" / "vm-a" / "console.log").write_bytes(b"hello")
    chunk = await world.service.read_console(CUSTOMER, "vm-a", 1, 100)
    assert (chunk.data, chunk.next_offset, chunk.size) == (b"ello", 5, 5)
