"""WallKeeper: the host namespace's nftables table, kept as it should be while VMs run.

It knows what the table must hold (the customer bridges found, the blocked ports, and with egress
the uplink and every attached VM's open rules), installs it atomically, and checks it every
`period` seconds and on each health check: a table removed or altered behind metald's back is
reported (degraded) and put back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection
from typing import Any

from metald.domain.errors import MetaldError
from metald.network import egress, ip, names, walls

log = logging.getLogger(__name__)


class WallKeeper:
    def __init__(self, host_netns: str, blocked_ports: Collection[int], uplink: str, period: float) -> None:
        self._host = host_netns
        self._blocked = tuple(blocked_ports)
        self.uplink = uplink  # "" = no egress
        self._period = period
        self._lock = asyncio.Lock()  # list, build and apply together: the last apply sees everything
        self._open: dict[str, tuple[str, ...]] = {}  # vm id -> its egress rules
        self._tasks: dict[str, asyncio.Task[None]] = {}

    # ---- what the table holds ----

    def open_for(self, vm_id: str, rules: list[str]) -> bool:
        """Record a VM's egress rules; True if that changes the table."""
        before = self._open.get(vm_id, ())
        if rules:
            self._open[vm_id] = tuple(rules)
        else:
            self._open.pop(vm_id, None)
        return before != tuple(rules)

    def close_for(self, vm_id: str) -> bool:
        return self._open.pop(vm_id, None) is not None

    async def take_over(self, live: dict[str, str]) -> None:
        """After a daemon restart: keep the installed egress rules of the VMs still running
        (live: rule tag -> vm id), drop the others'."""
        done = await ip.run(*ip.in_netns(self._host, "nft", "list", "chain", "inet", walls.TABLE, "egress"))
        if done.ok:
            for tag, rules in egress.tagged_rules(done.stdout).items():
                if tag in live:
                    self.open_for(live[tag], rules)
        await self.apply()

    async def apply(self) -> None:
        async with self._lock:
            await walls.apply(self._host, await self._ruleset(await self.bridges()))

    async def bridges(self) -> list[str]:
        return [
            str(link["ifname"])
            for link in await ip.links(self._host)
            if str(link["ifname"]).startswith(names.CUSTOMER_BRIDGE_PREFIX)
        ]

    async def _ruleset(self, bridges: list[str]) -> str:
        if not self.uplink:
            return walls.ruleset(bridges, self._blocked)
        allowed = tuple(rule for vm_id in sorted(self._open) for rule in self._open[vm_id])
        denied = tuple(egress.denied_lines(await self._uplink_networks() or [], self._blocked))
        return walls.ruleset(bridges, self._blocked, walls.EgressWalls(self.uplink, denied, allowed))

    async def _uplink_networks(self) -> list[str] | None:
        """The uplink's own networks (the host side of the way out); None if it is missing."""
        done = await ip.run(*ip.ip(self._host, "-j", "addr", "show", "dev", self.uplink))
        if not done.ok:
            return None
        info: list[dict[str, Any]] = ip.parse_list(done.stdout)
        return [f"{a['local']}/{a['prefixlen']}" for link in info for a in link.get("addr_info", [])]

    # ---- keeping it ----

    async def health(self, where: str) -> tuple[str, str]:
        bridges = await self.bridges()
        if bridges and not await self._intact(bridges):
            self._restore_now()
            return "degraded", f"{where}: nftables table inet {walls.TABLE} is missing or altered; restoring"
        if self.uplink and await self._uplink_networks() is None:
            return "degraded", f"{where}: egress uplink {self.uplink} does not exist"
        return "healthy", f"{where}: {len(bridges)} customer bridge(s)"

    def keep(self) -> None:
        """Start the periodic check (once; it runs until the daemon's event loop ends)."""
        if "periodic" not in self._tasks:
            self._tasks["periodic"] = asyncio.create_task(self._check_forever())

    def _restore_now(self) -> None:
        if "now" not in self._tasks:
            task = asyncio.create_task(self.check())
            self._tasks["now"] = task
            task.add_done_callback(lambda _: self._tasks.pop("now", None))

    async def _check_forever(self) -> None:
        while True:
            await asyncio.sleep(self._period)
            try:
                await self.check()
            except MetaldError as exc:
                log.warning("checking the nftables walls failed: %s", exc.message)

    async def check(self) -> None:
        """Put the table back if it is missing or was altered while VMs run."""
        if not ip.netns_exists(self._host):
            return
        async with self._lock:
            bridges = await self.bridges()
            if not bridges or await self._intact(bridges):
                return
            log.warning("nftables walls in %s missing or altered: restoring", self._host or "(root)")
            await walls.apply(self._host, await self._ruleset(bridges))

    async def _intact(self, bridges: list[str]) -> bool:
        expected = walls.rule_count(await self._ruleset(bridges))
        return await walls.installed_rules(self._host) == expected
