"""The small interfaces the service drives: a VMM backend, a store (by part) and guest networking.

Adapters live in metald/backends, metald/store and metald/network; the service and the domain
depend only on what is declared or re-exported here (the store's parts: metald/store/ports.py).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from metald.domain.model import NicAddress, RateLimit, Vm

# isort: off
from metald.store.ports import (  # re-exported: the store ports live beside their adapters
    AddressBook as AddressBook,
    EventLog as EventLog,
    EventRetention as EventRetention,
    Secrets as Secrets,
    SnapshotRecords as SnapshotRecords,
    Store as Store,
    StoreFullError as StoreFullError,
    VmRecords as VmRecords,
)
# isort: on

if TYPE_CHECKING:  # usecases imports this module
    from metald.usecases import ExecCommand, ExecResult, GuestFile

# ---- health ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckResult:
    """One health check: status is "healthy", "degraded" or "unhealthy" (the reporter times it)."""

    status: str
    detail: str = ""


# ---- backend --------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackendCapabilities:
    """What a backend can honour; the service refuses the rest before anything is created."""

    backend_type: str
    # Accepted cpu_template values -> the backend's own CPU model / template name.
    cpu_templates: Mapping[str, str]
    console_types: frozenset[str]
    supports_initrd: bool = True
    supports_pause: bool = True
    supports_graceful_reboot: bool = True
    supports_snapshots: bool = False
    max_vcpus: int = 32
    # Clones can boot into a VMM started ahead of time (WarmPoolBackend, docs/snapshots.md).
    supports_warm_pool: bool = False


@dataclass(frozen=True)
class DiskSpec:
    device_id: str
    host_path: Path  # the shared image (read-only devices) or the base of a per-VM overlay
    read_only: bool
    is_root: bool


@dataclass(frozen=True)
class NicSpec:
    interface_id: str
    tap_device: str
    mac: str
    rate_limit: RateLimit | None = None


@dataclass(frozen=True)
class LaunchSpec:
    """Everything a backend needs to run one VM, with host paths already resolved and checked."""

    vm_id: str
    vm_dir: Path
    vcpu_count: int
    memory_bytes: int
    cpu_template: str
    kernel: Path
    initrd: Path | None
    customer_kernel_args: str
    # metald's own guest arguments (vm id, NIC addresses); appended after the customer's.
    guest_kernel_args: str
    disks: tuple[DiskSpec, ...]
    nics: tuple[NicSpec, ...]
    netns: str | None  # network namespace the VMM runs in (holds the TAPs), None without NICs
    console_type: str  # "SERIAL" or "VIRTIO_CONSOLE", one of capabilities.console_types
    console_path: Path
    # Limits for sandboxing (cgroups): derived from the config by the service.
    labels: Mapping[str, str] = field(default_factory=dict)
    # A clone's first boot: restore this snapshot directory (Backend.snapshot) instead of booting.
    restore_from: Path | None = None

    # The backend's own CPU model for cpu_template (capabilities.cpu_templates[cpu_template], "" for
    # the backend's default), decided once by the service. None only in specs built by hand (tests,
    # the accel probe): the backend then looks cpu_template up itself.
    cpu_model: str | None = None
    # A clone's first boot into this warm pool slot (WarmPoolBackend.start_pool_slot) rather than a
    # VMM of its own; a slot that is gone makes the backend restore the normal way.
    pool_slot: Path | None = None
    # The canonical assets root that kernel, initrd and disk paths were resolved under, decided by
    # the service: the backend opens them beneath it following no symlink (metald/assets.py). None
    # in specs built by hand (tests, the accel probe): opened by path.
    assets_root: Path | None = None

    def __post_init__(self) -> None:
        """Disks in launch order, decided here once: the root device first (it becomes /dev/vda),
        the others in the order given."""
        ordered = tuple(sorted(self.disks, key=lambda d: not d.is_root))
        if ordered != self.disks:
            object.__setattr__(self, "disks", ordered)


@dataclass(frozen=True)
class SnapshotResult:
    size_bytes: int  # bytes the snapshot's files take
    paused_seconds: float  # how long the guest was stopped for it


@dataclass(frozen=True)
class VmRuntime:
    """What is true of a running VMM right now."""

    pid: int
    socket_path: str
    guest_ready: bool
    paused: bool = False
    extra: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class VmMetrics:
    cpu_time_nanos: int = 0
    memory_usage_bytes: int = 0
    disk_read_bytes: int = 0
    disk_write_bytes: int = 0
    network_rx_bytes: int = 0
    network_tx_bytes: int = 0


# Called by a backend when a VMM ends without being asked to (guest poweroff, crash, OOM kill).
ExitListener = Callable[[str, str], Awaitable[None]]


class Backend(Protocol):
    capabilities: BackendCapabilities

    def set_exit_listener(self, listener: ExitListener) -> None: ...

    async def prepare(self, spec: LaunchSpec) -> None:
        """Create the VM's files (directory, overlays). Idempotent; called at CreateVm."""

    async def start(self, spec: LaunchSpec) -> VmRuntime:
        """Start the VMM; returns once the VMM runs (not once the guest is up)."""

    async def wait_ready(self, vm_id: str, timeout: float) -> bool:
        """Wait until the guest has printed its ready line since the last (re)start or reset; False
        at the timeout. A VMM that ends first raises FAILED_PRECONDITION, reason VM_EXITED (metadata
        exit_reason), at once."""

    async def pause(self, vm_id: str) -> None: ...

    async def resume(self, vm_id: str) -> None: ...

    async def reboot(self, vm_id: str, *, force: bool) -> None: ...

    async def stop(self, vm_id: str, *, graceful: bool, timeout: float) -> str:
        """Stop the VMM; returns how it ended ("guest_poweroff", "killed", ...). Idempotent: a VMM
        already gone is "not_running", never an error."""

    async def destroy(self, vm_id: str, vm_dir: Path) -> None:
        """Stop if needed and remove every file of the VM. Idempotent: what is gone already is success."""

    async def adopt(self, spec: LaunchSpec) -> VmRuntime | None:
        """After a daemon restart: re-attach to this VM's VMM if it is really still running; None
        (last_exit_reason() then says why, "vmm_gone_while_daemon_down" when even the VMM's state
        files are gone, as after a host reboot) otherwise."""

    async def runtime(self, vm_id: str) -> VmRuntime | None: ...

    async def snapshot(self, vm_id: str, dest: Path) -> SnapshotResult:
        """Capture the running or paused VM (RAM, device state, disks at one stop) into the new
        directory `dest`; the VM ends in the state it was in. Needs capabilities.supports_snapshots."""

    def last_exit_reason(self, vm_id: str) -> str | None:
        """Why the VMM last ended by itself ("guest_poweroff", "oom_killed", ...), also when that was
        while no daemon watched (learnt in adopt()); None if unknown."""

    async def metrics(self, vm_id: str) -> VmMetrics: ...

    async def ping(self) -> CheckResult: ...

    async def close(self) -> None:
        """Detach from every VMM without stopping them (daemon shutdown)."""


class WarmPoolBackend(Protocol):
    """Warm pool slots (capabilities.supports_warm_pool): a VMM started ahead of time for a clone of
    one snapshot, waiting for its device state. A slot is a directory; `start` of a clone's spec
    with `pool_slot` set takes it over (its directory becomes the VM's)."""

    async def start_pool_slot(self, spec: LaunchSpec) -> None:
        """Start a slot for spec.restore_from in spec.vm_dir (made here); returns once it waits."""

    def pool_slot_running(self, slot_dir: Path) -> bool:
        """Whether the slot's VMM still waits (it was started by this daemon and not taken)."""

    async def stop_pool_slot(self, slot_dir: Path) -> None:
        """Kill the slot's VMM (also one left by an earlier daemon), remove its cgroup and
        directory. Idempotent."""


@dataclass(frozen=True)
class WarmPoolStatus:
    """The host's warm pools together (metald/service/pool.py), for /health and /metrics."""

    pools: int = 0  # snapshots with a warm_pool_size
    target: int = 0  # slots they ask for
    ready: int = 0  # slots waiting
    starting: int = 0
    hits: int = 0  # clone boots that took a slot
    misses: int = 0  # clone boots of a pooled snapshot that found none that fits
    blocked: tuple[str, ...] = ()  # "<snapshot_id>: why its pool is not full"


class ServiceEvents(Protocol):
    """What the service reports for metrics; the API layer implements it (Prometheus)."""

    def boot_finished(self, backend_type: str, seconds: float) -> None: ...

    def backend_error(self, backend_type: str, operation: str) -> None: ...

    def backend_operation(self, backend_type: str, operation: str, seconds: float) -> None: ...

    def vm_exited(self, reason: str) -> None: ...

    def snapshot_taken(self, backend_type: str, paused_seconds: float) -> None:
        """A snapshot was saved; its source's guest was stopped for `paused_seconds`."""


# ---- networking -----------------------------------------------------------------------------


@dataclass(frozen=True)
class InterfaceInfo:
    interface_id: str
    tap_device: str
    guest_mac: str
    host_device_name: str
    guest_ipv4: str = ""
    guest_ipv6: str = ""


@dataclass(frozen=True)
class TrafficCounters:
    """Bytes the guest received and sent, summed over its interfaces."""

    guest_rx_bytes: int = 0
    guest_tx_bytes: int = 0


@dataclass(frozen=True)
class NetworkAttachment:
    namespace: str
    nics: tuple[NicSpec, ...]
    interfaces: tuple[InterfaceInfo, ...]
    # A reading taken with the link state (describe()), not part of what the attachment is.
    counters: TrafficCounters = field(default=TrafficCounters(), compare=False)


class Network(Protocol):
    async def plan(self, vm: Vm) -> tuple[NicAddress, ...]:
        """At CreateVm: settle MACs and addresses (IPAM) for every interface; persistent."""

    async def release(self, vm: Vm) -> None:
        """At DeleteVm: give the addresses back. Idempotent."""

    async def attach(self, vm: Vm) -> NetworkAttachment:
        """At BootVm: namespace, TAPs, veth, bridge, rate limits. Idempotent."""

    async def detach(self, vm: Vm) -> None:
        """When the VMM is gone: remove all of the above. Idempotent."""

    async def describe(self, vm: Vm) -> NetworkAttachment | None:
        """What really exists for this VM now, with its traffic counters, from one read that
        spawns nothing (None if nothing exists, also while the VM's namespace is vanishing)."""

    async def remove_orphans(self, live_vm_ids: set[str]) -> list[str]:
        """Remove namespaces/devices of VMs not in the set; returns what was removed."""

    async def hold(self, holder: str, count: int) -> NetworkAttachment:
        """`count` TAPs for a VMM started before its VM (a warm pool slot named `holder`), in a
        namespace of their own that carries no traffic (links down, no address, no bridge)."""

    async def take_held(self, vm: Vm, holder: str) -> bool:
        """Before attach(vm): the holder's namespace becomes the VM's, its TAPs renamed to the
        VM's TAP names (attach then plumbs them as any). False if that cannot be done."""

    async def unhold(self, holder: str | None) -> None:
        """Remove the holder's namespace and what is left in it; None: every holder's (a restart
        removes them all). Idempotent."""

    async def ping(self) -> CheckResult: ...


# ---- guest agent ----------------------------------------------------------------------------


class GuestAgent(Protocol):
    """The agent inside a running guest (adapter: metald/agent). Errors are MetaldError:
    UNAVAILABLE with reason AGENT_UNAVAILABLE when it does not answer."""

    async def exec(self, vm_id: str, command: ExecCommand, timeout: float) -> ExecResult:
        """Run argv; past `timeout` seconds the command is killed in the guest (timed_out)."""

    async def write_file(self, vm_id: str, path: str, content: bytes, mode: int) -> None: ...

    async def read_file(self, vm_id: str, path: str) -> GuestFile: ...

    async def ping(self, vm_id: str, timeout: float) -> bool:
        """True as soon as the agent answers (the guest is up), False after `timeout`."""

    async def set_clock(self, vm_id: str) -> None:
        """Set the guest's wall clock to the host's."""

    async def add_entropy(self, vm_id: str, data: bytes) -> None:
        """Credit `data` to the guest's entropy pool and force a reseed of its CRNG."""

    async def set_identity(self, vm_id: str, guest_vm_id: str, nics: Sequence[NicAddress]) -> None:
        """Hostname and vm_id, then each NIC's MAC and addresses (in order: eth0, eth1, ...)."""

    async def refresh(
        self, vm_id: str, guest_vm_id: str, nics: Sequence[NicAddress], entropy: bytes, timeout: float
    ) -> None:
        """A restored clone's own clock, entropy (`entropy` credited, CRNG reseeded), hostname,
        vm_id and NICs, as soon as its agent answers (UNAVAILABLE if not within `timeout`)."""

    async def forget(self, vm_id: str) -> None:
        """Close the VM's channel (its VMM is gone or going)."""
