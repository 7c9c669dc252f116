"""Names of the files a QEMU VM keeps in its own directory (vm_dir).

Sockets are given to QEMU relative to vm_dir (its working directory) and reached by the daemon through
/proc/self/fd/N of an O_PATH handle on vm_dir, so a long vm_dir never hits the 108-byte limit of
AF_UNIX paths.
"""

from __future__ import annotations

from pathlib import Path

QMP_SOCKET = "qmp.sock"
AGENT_SOCKET = "agent.sock"
AGENT_PORT = "org.metald.agent"
SERIAL_LOG = "serial.log"  # ttyS0 when the customer's console is the virtio console
VMM_LOG = "vmm.log"  # stdout/stderr of the supervisor and QEMU
VMM_STATE = "vmm.json"  # written by the supervisor: pids and start times
EXIT_STATE = "exit.json"  # written by the supervisor when QEMU has been reaped
BOOT_STATE = "boot.json"  # written by the daemon: console offset of the current boot, accel, cpu

RUNTIME_FILES = (QMP_SOCKET, AGENT_SOCKET, VMM_STATE, EXIT_STATE)


def overlay_path(vm_dir: Path, index: int) -> Path:
    """Per-VM copy-on-write overlay of the index-th writable disk (in launch order)."""
    return vm_dir / f"disk{index}.qcow2"
