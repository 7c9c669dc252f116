"""The use cases of one host: create, boot, pause, resume, reboot, shut down, delete, inspect, list
and watch VMs; recovery after a restart. Split by concern:

- transitions.py: the one place that writes VM state (and its event);
- lifecycle.py, stopping.py: the operations that change a VM;
- queries.py, watch.py: reads and the event stream;
- recovery.py: the decision table of metald/domain/recovery.py carried out;
- launch.py: from a record to a backend's LaunchSpec;
- snapshots.py, pool.py: SnapshotVm and its kin; the snapshots' warm pools.
"""

from metald.service.base import ServiceOptions, ServicePorts
from metald.service.core import VmService

__all__ = ["ServiceOptions", "ServicePorts", "VmService"]
