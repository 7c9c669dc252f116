"""The Firecracker backend: one (optionally jailed) Firecracker per VM, driven over its REST API."""

from metald.backends.firecracker.backend import FirecrackerBackend

__all__ = ["FirecrackerBackend"]
