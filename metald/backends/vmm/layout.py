"""Files the per-VM supervisor keeps in a VM's directory (vm_dir), whatever the VMM."""

from __future__ import annotations

VMM_LOG = "vmm.log"  # stdout/stderr of the supervisor and the VMM, appended to at every start
VMM_STATE = "vmm.json"  # written by the supervisor: pids and start times
EXIT_STATE = "exit.json"  # written by the supervisor once the VMM has been reaped

STATE_FILES = (VMM_STATE, EXIT_STATE)
