"""One import point for a VMM backend (`from metald.backends.vmm import kit`): the shared
lifecycle, process supervision, sandbox and file helpers of vmm/, and the metald.ports types a
backend implements. A backend adds only its control channel and its launch description.

Not the package's __init__: the per-VM supervisor (vmm/supervisor.py) starts with every boot and
imports only what it needs.
"""

from metald.backends.vmm.backend import VmmBackend
from metald.backends.vmm.cgroups import VMM_MEMORY_OVERHEAD, Cgroups
from metald.backends.vmm.console import ReadyWatch, file_size
from metald.backends.vmm.jsonfile import read_json, write_json_atomic
from metald.backends.vmm.lifecycle import RunningVm, VmmLifecycle, vmm_failed
from metald.backends.vmm.process import CmdlineMatcher, VmmProcess, VmmStartError, read_log_tail
from metald.backends.vmm.relay import Relay
from metald.backends.vmm.sandbox import VmmUser, kvm_group, wrap_argv
from metald.backends.vmm.tools import run_tool, tool_missing, tool_version
from metald.ports import BackendCapabilities, CheckResult, LaunchSpec, SnapshotResult, VmMetrics, VmRuntime

__all__ = [
    "VMM_MEMORY_OVERHEAD",
    "BackendCapabilities",
    "Cgroups",
    "CheckResult",
    "CmdlineMatcher",
    "LaunchSpec",
    "ReadyWatch",
    "Relay",
    "RunningVm",
    "SnapshotResult",
    "VmMetrics",
    "VmRuntime",
    "VmmBackend",
    "VmmLifecycle",
    "VmmProcess",
    "VmmStartError",
    "VmmUser",
    "file_size",
    "kvm_group",
    "read_json",
    "read_log_tail",
    "run_tool",
    "tool_missing",
    "tool_version",
    "vmm_failed",
    "wrap_argv",
    "write_json_atomic",
]
