"""Guest networking on Linux (issue 4): see manager.LinuxNetwork."""

from metald.network.manager import LinuxNetwork

__all__ = ["LinuxNetwork"]
