"""metald: a VM provisioning daemon."""

__version__ = "0.2.0"
