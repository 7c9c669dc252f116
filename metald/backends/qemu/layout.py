"""Names of the files a QEMU VM keeps in its own directory (vm_dir), besides the supervisor's
(metald.backends.vmm.layout).

vm_dir belongs to root and the VMM cannot enter it: every file QEMU uses is opened by the daemon
and handed over as a descriptor (files.py). The daemon reaches the sockets through /proc/self/fd/N
of an O_PATH handle on vm_dir, so a long vm_dir never hits the 108-byte limit of AF_UNIX paths.
"""

from __future__ import annotations

from pathlib import Path

from metald.backends.vmm.layout import STATE_FILES

QMP_SOCKET = "qmp.sock"
AGENT_SOCKET = "agent.sock"
AGENT_PORT = "org.metald.agent"
SERIAL_LOG = "serial.log"  # ttyS0 when the customer's console is the virtio console
BOOT_STATE = "boot.json"  # written by the daemon: console offset of the current boot, accel, cpu
DISKS_STATE = "disks.json"  # written by the daemon: overlay file name -> the base image it was made over

RUNTIME_FILES = (QMP_SOCKET, AGENT_SOCKET, *STATE_FILES)


def overlay_path(vm_dir: Path, index: int) -> Path:
    """Per-VM copy-on-write overlay of the index-th writable disk (in launch order)."""
    return vm_dir / f"disk{index}.qcow2"
