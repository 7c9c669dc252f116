"""What restored clones need from the agent (issue 13), each checked inside a real guest: readiness
over the guest channel, the wall clock from the host, host entropy with a reseed, a new identity."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest

from metald.agent.pool import GuestAgentPool
from metald.backends.qemu.agent import agent_connector
from metald.domain.errors import MetaldError
from metald.domain.model import NicAddress
from metald.usecases import ExecCommand
from tests.e2e.test_agent_api import agent_daemon, owner  # noqa: F401  (module fixtures)
from tests.support.daemon import Daemon
from tests.support.rpc import Rpc

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def booting(owner: Rpc) -> str:  # noqa: F811
    """A VM with one NIC, booted without waiting: readiness is learnt over the agent channel."""
    vm_id = owner.create({"network": [{"interface_id": "eth0"}]}, vm_id="opsvm")
    owner.ok("BootVm", {"vm_id": vm_id})
    return vm_id


@pytest.fixture
async def pool(agent_daemon: Daemon) -> AsyncIterator[GuestAgentPool]:  # noqa: F811
    # The test's own pool; the daemon never talks to this VM's agent, so the socket is free.
    p = GuestAgentPool(agent_connector(agent_daemon.data_dir / "vms"))
    yield p
    await p.close()


async def sh(pool: GuestAgentPool, vm_id: str, script: str) -> str:
    result = await pool.exec(vm_id, ExecCommand(("sh", "-c", script)), 10)
    assert result.exit_code == 0, result
    return result.stdout.decode()


async def test_readiness_ping_instead_of_the_console_line(
    agent_daemon: Daemon,  # noqa: F811
    booting: str,
    pool: GuestAgentPool,
) -> None:
    assert await pool.ping(booting, 60), "the agent never answered"
    # The agent starts after /etc/rc finished: the guest is up, its ready line is out.
    console = (agent_daemon.data_dir / "vms" / booting / "console.log").read_text(errors="replace")
    assert f"METALD_READY vm_id={booting}" in console
    started = time.monotonic()
    assert await pool.ping(booting, 5)
    assert time.monotonic() - started < 1, "an up agent answers at once"


async def test_wall_clock_is_set_from_the_host(booting: str, pool: GuestAgentPool) -> None:
    assert await pool.ping(booting, 60)
    await sh(pool, booting, "date -s @1000000000 >/dev/null")  # 2001: as stale as a snapshot gets
    assert await pool.clock_offset(booting) < -10 * 365 * 86400
    await pool.set_clock(booting)
    offset = await pool.clock_offset(booting)
    assert abs(offset) < 0.1, offset
    host_seconds = time.time()
    assert abs(int(await sh(pool, booting, "date +%s")) - host_seconds) < 2  # what programs see


async def test_entropy_is_added_and_the_crng_reseeded(booting: str, pool: GuestAgentPool) -> None:
    assert await pool.ping(booting, 60)
    await pool.add_entropy(booting, bytes(range(256)) * 2)  # both ioctls succeeded in the guest
    with pytest.raises(MetaldError) as e:
        await pool.add_entropy(booting, b"x" * 5000)
    assert e.value.code.name == "INVALID_ARGUMENT"


async def test_identity_hostname_vm_id_mac_and_addresses(booting: str, pool: GuestAgentPool) -> None:
    assert await pool.ping(booting, 60)
    old_mac = (await sh(pool, booting, "cat /sys/class/net/eth0/address")).strip()
    new_mac = "02:fc:00:00:00:07"
    assert old_mac != new_mac
    nic = NicAddress("eth0", new_mac, guest_ipv4="10.99.0.7/24", guest_ipv6="fd00:99::7/64")
    await pool.set_identity(booting, "clone-7", [nic])
    seen = await sh(
        pool, booting, "hostname; cat /run/metald/vm_id /sys/class/net/eth0/address; ip addr show dev eth0"
    )
    hostname, vm_id, mac, *addresses = seen.splitlines()
    assert (hostname, vm_id, mac) == ("clone-7", "clone-7", new_mac)
    text = "\n".join(addresses)
    assert "inet 10.99.0.7/24" in text and "inet6 fd00:99::7/64" in text and ",UP," in text, text
    assert "10.240." not in text, "the template's address is gone"


async def test_identity_failure_is_reported(booting: str, pool: GuestAgentPool) -> None:
    assert await pool.ping(booting, 60)
    with pytest.raises(MetaldError) as e:
        await pool.set_identity(booting, "clone-8", [NicAddress("eth9", "02:fc:00:00:00:08")] * 2)
    assert e.value.reason == "GUEST_IDENTITY_FAILED"


async def test_refresh_sets_clock_entropy_hostname_vm_id_and_nics_at_once(
    booting: str, pool: GuestAgentPool
) -> None:
    assert await pool.ping(booting, 60)
    await sh(pool, booting, "date -s @1000000000 >/dev/null")
    new_mac = "02:fc:00:00:00:09"
    nic = NicAddress("eth0", new_mac, guest_ipv4="10.99.0.9/24")
    await pool.refresh(booting, "clone-9", [nic], bytes(range(256)), timeout=10)
    assert abs(await pool.clock_offset(booting)) < 0.5
    seen = await sh(
        pool, booting, "hostname; cat /run/metald/vm_id /sys/class/net/eth0/address; ip addr show dev eth0"
    )
    hostname, vm_id, mac, *addresses = seen.splitlines()
    assert (hostname, vm_id, mac) == ("clone-9", "clone-9", new_mac)
    assert "inet 10.99.0.9/24" in "\n".join(addresses)
    # Checked before anything changes: a hostname the kernel refuses leaves the old one.
    with pytest.raises(MetaldError) as e:
        await pool.refresh(booting, "x" * 65, [], bytes(range(256)), timeout=10)
    assert e.value.reason == "GUEST_IDENTITY_FAILED" and "hostname" in e.value.message
    assert (await sh(pool, booting, "hostname")).strip() == "clone-9"


NET_STATE = "ip addr show dev eth0; ip route; ip -6 route; cat /proc/sys/net/ipv6/conf/eth0/accept_dad"


async def test_the_agent_sets_a_nic_to_the_end_state_of_the_ip_path(
    booting: str, pool: GuestAgentPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert await pool.ping(booting, 60)
    nic = NicAddress("eth0", "02:fc:00:00:00:0a", "10.99.0.10/24", "10.99.0.1", "fd00:99::a/64", "fd00:99::1")
    await pool.set_identity(booting, "clone-10", [nic])  # metald-net.sh's ip commands
    by_ip = await sh(pool, booting, NET_STATE)
    await sh(pool, booting, "ip link set eth0 address 02:fc:00:00:00:0b; ip addr add 10.98.0.2/24 dev eth0")
    execs: list[ExecCommand] = []
    exec_ = pool.exec

    async def counted(vm_id: str, command: ExecCommand, timeout: float) -> object:
        execs.append(command)
        return await exec_(vm_id, command, timeout)

    monkeypatch.setattr(pool, "exec", counted)
    await pool.refresh(booting, "clone-10", [nic], bytes(range(256)), timeout=10)
    assert execs == [], "agent version 3 sets the NICs itself, in the REFRESH"
    monkeypatch.undo()
    native = await sh(pool, booting, NET_STATE)
    assert native == by_ip
    assert "link/ether 02:fc:00:00:00:0a" in native and "inet 10.99.0.10/24" in native, native
    assert "inet6 fd00:99::a/64" in native and "10.98.0.2" not in native, native
    assert "default via 10.99.0.1 dev eth0" in native and "metric 100" in native, native
    assert "default via fd00:99::1 dev eth0" in native, native


async def test_a_nic_the_agent_cannot_set_is_an_identity_failure(booting: str, pool: GuestAgentPool) -> None:
    assert await pool.ping(booting, 60)
    nics = [NicAddress("eth0", "02:fc:00:00:00:0c"), NicAddress("eth1", "02:fc:00:00:01:0c")]
    with pytest.raises(MetaldError) as e:
        await pool.refresh(booting, "clone-12", nics, bytes(range(256)), timeout=10)
    assert e.value.reason == "GUEST_IDENTITY_FAILED" and "eth1: interface" in e.value.message, e.value
