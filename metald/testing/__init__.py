"""Fakes shipped with metald for in-process tests of anything that drives its ports: a backend and
a network that keep their world in memory, with failure injection and hooks to hold an operation
halfway. No root, no QEMU, no namespaces."""

from metald.testing.backend import FakeBackend
from metald.testing.events import RecordingEvents
from metald.testing.faults import Faults
from metald.testing.network import FakeNetwork

__all__ = ["FakeBackend", "FakeNetwork", "Faults", "RecordingEvents"]
