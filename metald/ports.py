"""The small interfaces the service drives: a VMM backend, a store (by part) and guest networking.

Adapters live in metald/backends, metald/store and metald/network; the service and the domain
depend only on what is declared here.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from metald.domain.events import VmEvent
from metald.domain.model import NicAddress, RateLimit, Vm
from metald.domain.snapshots import Snapshot
from metald.domain.states import VmState

if TYPE_CHECKING:  # usecases imports this module
    from metald.usecases import ExecCommand, ExecResult, GuestFile

# ---- health ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckResult:
    """One health check: status is "healthy", "degraded" or "unhealthy"."""

    status: str
    detail: str = ""
    duration_ms: float = 0.0


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


class ServiceEvents(Protocol):
    """What the service reports for metrics; the API layer implements it (Prometheus)."""

    def boot_finished(self, backend_type: str, seconds: float) -> None: ...

    def backend_error(self, backend_type: str, operation: str) -> None: ...

    def backend_operation(self, backend_type: str, operation: str, seconds: float) -> None: ...

    def vm_exited(self, reason: str) -> None: ...

    def snapshot_taken(self, backend_type: str, paused_seconds: float) -> None:
        """A snapshot was saved; its source's guest was stopped for `paused_seconds`."""


# ---- store ----------------------------------------------------------------------------------


class StoreFullError(Exception):
    """The store could not write (disk full, read-only): nothing was changed."""


class VmRecords(Protocol):
    """The VM records. Each change may carry the VmEvent describing it: the store writes both in
    one transaction (assigning the event's seq), so the event log misses nothing."""

    async def insert(self, vm: Vm, event: VmEvent) -> Vm:
        """Store a new VM and return it with `seq` set; raises KeyError if the id is taken."""

    async def get(self, vm_id: str) -> Vm | None: ...

    async def save(self, vm: Vm, event: VmEvent | None = None) -> None:
        """Persist state, nics, shutdown_reason, pending and updated_at of an existing VM."""

    async def delete(self, vm_id: str, event: VmEvent | None = None) -> None: ...

    async def list_page(
        self, customer_id: str, states: Sequence[VmState], after_seq: int, limit: int
    ) -> list[Vm]: ...

    async def count(self, customer_id: str, states: Sequence[VmState]) -> int: ...

    async def all_vms(self) -> list[Vm]: ...

    async def state_counts(self) -> dict[tuple[str, VmState], int]:
        """Number of VMs per (customer, state)."""

    async def usage(self, customer_id: str | None, states: Sequence[VmState] = ()) -> tuple[int, int, int]:
        """(VM count, total vCPUs, total memory bytes) of one customer (or the host if None),
        over VMs in `states` (all states if empty)."""


class AddressBook(Protocol):
    """Addresses handed out by IPAM: unique per (pool, address)."""

    async def claim_address(self, pool: str, address: str, owner: str) -> bool:
        """True if the address was free and is now the owner's."""

    async def used_addresses(self, pool: str) -> set[str]: ...

    async def release_addresses(self, owner: str) -> None: ...


class Secrets(Protocol):
    async def secret(self, name: str, make: bytes) -> bytes:
        """A persistent secret: the stored one, or `make` stored now."""


class SnapshotRecords(Protocol):
    """Snapshot records. Deleted ones are hidden from get/list/count/usage at once but kept
    (their files too) until the last clone is gone; then the service purges them."""

    async def insert(self, snapshot: Snapshot) -> Snapshot:
        """Store a new snapshot and return it with `seq` set; KeyError if the id was ever taken
        by a snapshot not yet purged."""

    async def get(self, snapshot_id: str) -> Snapshot | None:
        """The snapshot unless deleted (pending ones included, as for VMs)."""

    async def save(self, snapshot: Snapshot) -> None:
        """Persist size_bytes, pending and warm_pool_size of an existing snapshot."""

    async def list_page(self, customer_id: str, after_seq: int, limit: int) -> list[Snapshot]:
        """The customer's snapshots by seq, neither deleted nor still being created."""

    async def count(self, customer_id: str) -> int:
        """How many list_page would list in all."""

    async def usage(self, customer_id: str) -> tuple[int, int]:
        """(count, total size_bytes) of the customer's snapshots not deleted (pending included),
        for quotas."""

    async def mark_deleted(self, snapshot_id: str) -> None: ...

    async def clone_count(self, snapshot_id: str) -> int:
        """VMs whose snapshot_id is this one."""

    async def unused_deleted(self) -> list[Snapshot]:
        """Deleted snapshots no VM was cloned from any more: their files may go, then purge()."""

    async def purge(self, snapshot_id: str) -> None:
        """Forget the record for good (after its files are removed). Idempotent."""

    async def all_snapshots(self) -> list[Snapshot]:
        """Every record, deleted and pending included, by seq (recovery)."""


@dataclass(frozen=True)
class EventRetention:
    """How many events the log keeps (the newest `count`), and for how long (0: no age limit)."""

    count: int = 100_000
    max_age_seconds: float = 0.0


class EventLog(Protocol):
    """The VM events the records wrote, in seq order, pruned to the retention."""

    async def events_after(self, customer_id: str, after_seq: int, limit: int) -> list[VmEvent]:
        """That customer's events with seq > after_seq, ascending, at most `limit`."""

    async def first_seq(self) -> int:
        """The oldest kept seq (0 if none): a cursor below first_seq - 1 lost events to pruning."""

    async def last_seq(self) -> int:
        """The newest seq ever assigned (0 if none)."""

    async def prune(self) -> int:
        """Apply the retention now (the store also does on writes); returns how many were dropped."""


class Store(Protocol):
    """The parts of one store; each consumer gets only the part it needs."""

    @property
    def vms(self) -> VmRecords: ...

    @property
    def addresses(self) -> AddressBook: ...

    @property
    def secrets(self) -> Secrets: ...

    @property
    def events(self) -> EventLog: ...

    @property
    def snapshots(self) -> SnapshotRecords: ...

    async def ping(self) -> CheckResult: ...

    async def close(self) -> None: ...


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

    async def forget(self, vm_id: str) -> None:
        """Close the VM's channel (its VMM is gone or going)."""
