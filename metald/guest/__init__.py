"""Guest image builder: kernel, initramfs and root filesystem for metald's microVMs."""

from metald.guest.builder import GuestImage, build_cli, build_guest_image
from metald.guest.proc import GuestBuildError

__all__ = ["GuestBuildError", "GuestImage", "build_cli", "build_guest_image"]
