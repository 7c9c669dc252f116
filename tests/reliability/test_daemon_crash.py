"""Daemon crash: `kill -9` of metald in the middle of creates, boots, shutdowns and deletes.

Each round sends one to three operations on different VMs, each sent a random few milliseconds to
seconds (drawn from a fixed seed, printed) before the kill, so that most are caught halfway and
some just after they finished. After each restart:

- every VM the test knows is still there with the same record (config, created_at, NIC identity)
  and the same state, and every running or paused VM runs on in the same QEMU process (re-adopted;
  PauseVm and ResumeVm work on it, and later rounds shut it down);
- each interrupted operation is finished or rolled back: the VM is fully in the state before or fully
  in the state after (an acknowledged one is always after), never pending in the store;
- the host holds exactly what the surviving VMs need: one QEMU and supervisor per running VM, one
  directory per VM, sockets only of running VMs, a namespace, TAP and veth only per running VM with a
  NIC, IP addresses only of existing VMs; no other process, directory, namespace or device.

The seed fixes the schedule (operations, targets, delays), not where exactly the kill lands: that
depends on the machine's speed. Set METALD_RELIABILITY_SEED to replay another schedule.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from metald.network import names
from tests.reliability.common import knob
from tests.reliability.conftest import MakeDaemon
from tests.reliability.host import Footprint, cgroups_of, db_rows
from tests.support.daemon import Daemon
from tests.support.rpc import Rpc

pytestmark = [pytest.mark.e2e, pytest.mark.reliability]

SEED = knob("SEED", 8008, 8008)
ROUNDS = knob("CRASH_ROUNDS", 8, 80)
MAX_VMS = 8
MAX_RUNNING = 3  # two cores: at most three TCG guests at once
CUSTOMER = "crash"
NIC = {"network": [{"interface_id": "eth0"}]}
# Roughly how long each operation takes here (QEMU TCG on two shared cores). The kill comes
# uniformly 0..1.3x this after the call is sent: mostly halfway, sometimes just after.
TYPICAL = {"create": 0.07, "boot": 1.2, "shutdown": 0.4, "graceful_shutdown": 2.5, "delete": 0.2}
ACTIVE = {"VM_STATE_RUNNING", "VM_STATE_PAUSED"}


@dataclass
class Vm:
    vm_id: str
    nic: bool
    state: str
    pid: int | None = None
    created_at: str = ""
    nic_identity: dict[str, str] = field(default_factory=dict)  # mac and addresses, once seen


@dataclass
class Call:
    kind: str
    vm_id: str
    method: str
    body: dict[str, Any]
    lead: float  # seconds between sending it and the kill
    status: int | None = None  # the answer, if it came before the kill
    text: str = ""
    error: str = ""


class World:
    """What the test knows to be true, and the checks of the daemon against it."""

    def __init__(self, daemon: Daemon, rng: random.Random) -> None:
        self.daemon = daemon
        self.rpc = Rpc(daemon.url, CUSTOMER)
        self.rng = rng
        self.vms: dict[str, Vm] = {}
        self.configs: dict[bool, dict[str, Any]] = {}  # the full config a template is stored as
        self.next_id = 0
        self.stats: Counter[str] = Counter()
        self.failures: list[str] = []

    # ---- planning a round ----------------------------------------------------------------------

    def new_id(self) -> str:
        self.next_id += 1
        return f"rel-crash-{self.next_id:03d}"

    @property
    def ever(self) -> list[str]:
        """Every VM id the test has used."""
        return [f"rel-crash-{n:03d}" for n in range(1, self.next_id + 1)]

    def plan(self, round_no: int) -> list[Call]:
        rng = self.rng
        running = sum(vm.state in ACTIVE for vm in self.vms.values())
        kinds = ["create", "boot", "shutdown", "delete"]
        first = kinds[round_no % 4]
        order = [first, *rng.sample([k for k in kinds if k != first], 3)]
        kinds_wanted = rng.randint(1, 3)
        calls: list[Call] = []
        used: set[str] = set()
        body: dict[str, Any]

        def pick(states: set[str]) -> Vm | None:
            options = [v for v in self.vms.values() if v.state in states and v.vm_id not in used]
            return rng.choice(sorted(options, key=lambda v: v.vm_id)) if options else None

        for kind in order:
            if len({c.kind for c in calls}) == kinds_wanted:
                break
            if kind == "create":  # fast: a burst of up to three, so that one is likely caught halfway
                for _ in range(min(rng.randint(1, 3), MAX_VMS - len(self.vms))):
                    vm_id, nic = self.new_id(), rng.random() < 0.5
                    lead = rng.uniform(0, 1.3 * TYPICAL["create"])
                    create = {"vm_id": vm_id, "config": NIC if nic else {}}
                    calls.append(Call("create", vm_id, "CreateVm", create, lead))
                    self.vms[vm_id] = Vm(vm_id, nic, "absent")  # judged after the restart
            elif kind == "boot" and running < MAX_RUNNING:
                vm = pick({"VM_STATE_CREATED", "VM_STATE_SHUTDOWN"})
                if vm is not None:
                    running += 1
                    lead = rng.uniform(0, 1.3 * TYPICAL["boot"])
                    calls.append(Call("boot", vm.vm_id, "BootVm", {"vm_id": vm.vm_id}, lead))
            elif kind == "shutdown":
                vm = pick(ACTIVE)
                if vm is not None:
                    force = rng.random() < 0.5
                    typical = TYPICAL["shutdown" if force else "graceful_shutdown"]
                    body = {"vm_id": vm.vm_id, "force": force, "timeout_seconds": 4}
                    calls.append(
                        Call("shutdown", vm.vm_id, "ShutdownVm", body, rng.uniform(0, 1.3 * typical))
                    )
            elif kind == "delete":  # fast too: up to two at once
                for _ in range(rng.randint(1, 2)):
                    vm = pick({"VM_STATE_CREATED", "VM_STATE_SHUTDOWN", *ACTIVE})
                    if vm is not None:
                        lead = rng.uniform(0, 1.3 * TYPICAL["delete"])
                        calls.append(
                            Call("delete", vm.vm_id, "DeleteVm", {"vm_id": vm.vm_id, "force": True}, lead)
                        )
                        used.add(vm.vm_id)
            used |= {c.vm_id for c in calls}
        assert calls, "nothing to do: top_up() keeps VMs to delete at least"
        return calls

    # ---- one round -----------------------------------------------------------------------------

    def fire_and_kill(self, calls: list[Call]) -> None:
        """Send each call `lead` seconds before a SIGKILL of the daemon; collect what came back."""
        kill_at = max(c.lead for c in calls) + 0.005
        clients = [Rpc(self.daemon.url, CUSTOMER) for _ in calls]
        for client in clients:  # connected beforehand: the lead is from the request's first byte
            client.client.get("/health")

        def send(call: Call, client: Rpc) -> None:
            time.sleep(kill_at - call.lead)
            try:
                resp = client.call(call.method, call.body)
                call.status, call.text = resp.status_code, resp.text[:300]
            except httpx.TransportError as exc:
                call.error = type(exc).__name__
            finally:
                client.client.close()

        threads = [threading.Thread(target=send, args=pair) for pair in zip(calls, clients, strict=True)]
        started = time.monotonic()
        for t in threads:
            t.start()
        time.sleep(kill_at - (time.monotonic() - started))
        self.daemon.kill9()
        for t in threads:
            t.join(30)
        for call in calls:
            self.stats[f"{call.kind} {'cut' if call.status is None else 'answered'}"] += 1
        # What the kill caught halfway, as the store says (recovery finishes or undoes these).
        for _, pending in db_rows(self.daemon.data_dir, "SELECT vm_id, pending FROM vms WHERE pending != ''"):
            self.stats[f"pending {pending}"] += 1

    def observe(self) -> dict[str, dict[str, Any]]:
        ids: list[str] = []
        token = ""
        while True:
            page = self.rpc.ok("ListVms", {"page_size": 100, "page_token": token})
            ids += [v["vm_id"] for v in page.get("vms", [])]
            token = page.get("next_page_token", "")
            if not token:
                return {vm_id: self.rpc.info(vm_id) for vm_id in ids}

    def fail(self, message: str) -> None:
        self.failures.append(message)

    def judge(self, round_no: int, calls: list[Call], seen: dict[str, dict[str, Any]]) -> None:
        """Compare what the restarted daemon shows with what may be true; update the model."""
        by_vm = {c.vm_id: c for c in calls}
        where = f"round {round_no} (seed {SEED})"
        for sent in calls:
            if sent.status not in (None, 200):
                self.fail(f"{where}: {sent.method} {sent.vm_id} answered {sent.status} {sent.text}")
        for vm_id in sorted(set(seen) - set(self.vms)):
            self.fail(f"{where}: unknown VM {vm_id} appeared")
        for vm_id, vm in list(self.vms.items()):
            call = by_vm.get(vm_id)
            info = seen.get(vm_id)
            state = info["state"] if info else "absent"
            pid = int(info["backend_info"]["process_id"]) if info and state in ACTIVE else None
            done = call is not None and call.status == 200
            if call is None:
                allowed = {vm.state}
            elif call.kind == "create":
                allowed = {"VM_STATE_CREATED"} if done else {"absent", "VM_STATE_CREATED"}
            elif call.kind == "boot":
                allowed = {"VM_STATE_RUNNING"} if done else {vm.state, "VM_STATE_RUNNING"}
            elif call.kind == "shutdown":
                allowed = {"VM_STATE_SHUTDOWN"} if done else {vm.state, "VM_STATE_SHUTDOWN"}
            else:
                allowed = {"absent"} if done else {vm.state, "absent"}
            what = f"{where}: {vm_id} ({call.method + (' answered' if done else ' interrupted') if call else 'untouched'})"
            if state not in allowed:
                self.fail(f"{what} is {state}, expected one of {sorted(allowed)}")
            if state == vm.state and state in ACTIVE and pid != vm.pid:
                self.fail(f"{what}: runs as pid {pid}, was {vm.pid}: not re-adopted")
            if info is not None:
                self.check_record(what, vm, info)
            if state == "absent":
                del self.vms[vm_id]
            else:
                vm.state, vm.pid = state, pid

    def check_record(self, what: str, vm: Vm, info: dict[str, Any]) -> None:
        expected = self.configs.setdefault(vm.nic, info["config"])
        if info["config"] != expected:
            self.fail(f"{what}: config changed: {info['config']} != {expected}")
        vm.created_at = vm.created_at or info["created_at"]
        if info["created_at"] != vm.created_at:
            self.fail(f"{what}: created_at changed: {info['created_at']} != {vm.created_at}")
        if vm.nic and info["state"] in ACTIVE:
            nic = info.get("network_info", {}).get("interfaces", [{}])[0]
            identity = {k: nic.get(k, "") for k in ("guest_mac", "guest_ipv4", "guest_ipv6", "tap_device")}
            vm.nic_identity = vm.nic_identity or identity
            if identity != vm.nic_identity:
                self.fail(f"{what}: NIC changed: {identity} != {vm.nic_identity}")

    def check_host(self, where: str) -> None:
        """Exactly the resources the surviving VMs need, nothing else; nothing pending in the store."""
        fp = Footprint.of(self.daemon, self.ever)
        active = {v.vm_id: v for v in self.vms.values() if v.state in ACTIVE}
        with_nic = [v.vm_id for v in active.values() if v.nic]
        namespaces = {names.vm_netns(vm_id) for vm_id in with_nic}
        expect: dict[str, object] = {
            "qemus": {v.pid for v in active.values()},
            "supervisors (count)": len(active),
            "zombies": set(),
            "vm_dirs": set(self.vms),
            "namespaces": namespaces,
            "taps": {f"{names.vm_netns(i)}/{names.tap_device(i, 0)}" for i in with_nic},
            "host veths": {names.host_veth(i, 0) for i in with_nic},
            "root links": set(),
            "cgroups": cgroups_of(active, self.daemon.data_dir / "vms"),
        }
        got: dict[str, object] = {
            "qemus": set(fp.qemus),
            "supervisors (count)": len(fp.supervisors),
            "zombies": set(fp.zombies),
            "vm_dirs": set(fp.vm_dirs),
            "namespaces": set(fp.namespaces),
            "taps": set(fp.taps),
            "host veths": {link for link in fp.host_links if link.startswith(names.HOST_VETH_PREFIX)},
            "root links": set(fp.root_links),
            "cgroups": set(fp.cgroups),
        }
        for key, value in expect.items():
            if got[key] != value:
                self.fail(f"{where}: {key}: host has {got[key]}, expected {value}")
        sockets = {s for s in fp.sockets if s.split("/")[1] not in active}
        if sockets:
            self.fail(f"{where}: sockets of VMs that do not run: {sorted(sockets)}")
        pending = db_rows(self.daemon.data_dir, "SELECT vm_id, pending FROM vms WHERE pending != ''")
        if pending:
            self.fail(f"{where}: half-done operations left in the store: {pending}")
        vm_owned = "SELECT DISTINCT owner FROM addresses WHERE owner NOT LIKE 'customer:%'"
        owners = {r[0] for r in db_rows(self.daemon.data_dir, vm_owned)}
        if owners - set(self.vms):
            self.fail(f"{where}: IP addresses still held by deleted VMs: {sorted(owners - set(self.vms))}")
        if db_rows(self.daemon.data_dir, "PRAGMA integrity_check") != [("ok",)]:
            self.fail(f"{where}: store integrity check failed")

    def exercise(self) -> None:
        """Control every re-adopted VMM: pause and resume it (some stay paused for the next kill)."""
        for vm in sorted(self.vms.values(), key=lambda v: v.vm_id):
            if vm.state == "VM_STATE_PAUSED":
                self.expect_state("ResumeVm", vm, "VM_STATE_RUNNING")
            if vm.state == "VM_STATE_RUNNING":
                self.expect_state("PauseVm", vm, "VM_STATE_PAUSED")
                if self.rng.random() < 0.7:
                    self.expect_state("ResumeVm", vm, "VM_STATE_RUNNING")

    def top_up(self) -> None:
        """Keep at least three VMs, one of them running, for the next rounds to work on."""
        while len(self.vms) < 3:
            vm_id, nic = self.new_id(), self.rng.random() < 0.5
            self.rpc.ok("CreateVm", {"vm_id": vm_id, "config": NIC if nic else {}})
            self.vms[vm_id] = Vm(vm_id, nic, "VM_STATE_CREATED")
        if not any(v.state in ACTIVE for v in self.vms.values()):
            vm = min(self.vms.values(), key=lambda v: v.vm_id)
            self.rpc.ok("BootVm", {"vm_id": vm.vm_id})
            vm.state, vm.pid = "VM_STATE_RUNNING", int(self.rpc.info(vm.vm_id)["backend_info"]["process_id"])
        for vm in self.vms.values():
            self.check_record("top-up", vm, self.rpc.info(vm.vm_id))

    def expect_state(self, method: str, vm: Vm, state: str) -> None:
        resp = self.rpc.call(method, {"vm_id": vm.vm_id})
        if resp.status_code != 200 or resp.json().get("state") != state:
            self.fail(f"{method} on re-adopted {vm.vm_id}: {resp.status_code} {resp.text[:200]}")
        else:
            vm.state = state


def test_kill9_mid_operation_finishes_or_undoes_and_leaks_nothing(make_daemon: MakeDaemon) -> None:
    print(f"seed={SEED} rounds={ROUNDS}")
    daemon = make_daemon(name="rel-crs")
    world = World(daemon, random.Random(SEED))
    for nic in (True, False):  # a running VM of each kind before the first kill
        vm_id = world.new_id()
        world.rpc.ok("CreateVm", {"vm_id": vm_id, "config": NIC if nic else {}})
        world.rpc.ok("BootVm", {"vm_id": vm_id})
        pid = int(world.rpc.info(vm_id)["backend_info"]["process_id"])
        world.vms[vm_id] = Vm(vm_id, nic, "VM_STATE_RUNNING", pid)
    world.judge(0, [], world.observe())  # learns their records
    world.check_host("before the first kill")
    assert not world.failures, world.failures

    started = time.monotonic()
    for round_no in range(1, ROUNDS + 1):
        calls = world.plan(round_no)
        world.fire_and_kill(calls)
        sent = ", ".join(
            f"{c.method}({c.vm_id}) {c.lead * 1000:.0f}ms {'->' + str(c.status) if c.status else 'cut'}"
            for c in calls
        )
        print(f"round {round_no}: {sent}")
        daemon.start()
        world.judge(round_no, calls, world.observe())
        world.check_host(f"round {round_no} (seed {SEED})")
        assert not world.failures, "\n".join(world.failures)
        world.exercise()
        world.top_up()
        assert not world.failures, "\n".join(world.failures)
        print(f"  then: {sorted(Counter(v.state[9:] for v in world.vms.values()).items())}")

    print(
        f"{ROUNDS} kills in {time.monotonic() - started:.0f}s; outcomes: {dict(sorted(world.stats.items()))}"
    )
    halfway = sum(n for k, n in world.stats.items() if k.startswith("pending"))
    assert halfway >= ROUNDS // 4, f"too few operations caught halfway: {world.stats}"

    # Re-adopted VMs shut down normally; then everything goes and nothing is left.
    for vm in list(world.vms.values()):
        if vm.state in ACTIVE:
            assert world.rpc.ok("ShutdownVm", {"vm_id": vm.vm_id})["state"] == "VM_STATE_SHUTDOWN"
        world.rpc.ok("DeleteVm", {"vm_id": vm.vm_id})
    world.vms.clear()
    world.check_host("after deleting everything")
    assert not world.failures, "\n".join(world.failures)
    fp = Footprint.of(daemon, world.ever)
    assert not (fp.vm_dirs | fp.sockets | fp.namespaces | fp.qemus | fp.supervisors | fp.cgroups), fp
    assert db_rows(daemon.data_dir, "SELECT COUNT(*) FROM vms") == [(0,)]
