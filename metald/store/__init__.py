"""Storage adapters for metald.ports.VmStore."""
