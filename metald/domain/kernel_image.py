"""Whether the first bytes of a file are a kernel image a VMM can load: a cheap check of its header
(no decompression, no parsing beyond magic numbers), so a text file or random bytes given as
`kernel_path` is refused at CreateVm as KERNEL_INVALID, not found out when QEMU fails at boot.

Accepted: ELF (vmlinux, PVH; what Firecracker loads), the x86 boot protocol's bzImage ("HdrS"
at 0x202 after the 0xAA55 boot flag; EFI-stub kernels too), the arm64 Image header ("ARM\\x64" at
0x38) and a Multiboot header (magic and checksum, 4-aligned in the first 8 KiB). Whether the
kernel then boots is still found out at boot (FAILED_PRECONDITION KERNEL_INVALID).
"""

from __future__ import annotations

import struct

from metald.domain.errors import ErrorCode, kernel_invalid

KERNEL_HEAD_BYTES = 8192  # what a check needs: the Multiboot search window
_ELF = b"\x7fELF"
_BZIMAGE_FLAG = (0x1FE, b"\x55\xaa")
_BZIMAGE_MAGIC = (0x202, b"HdrS")
_ARM64_MAGIC = (0x38, b"ARM\x64")
_MULTIBOOT_MAGIC = 0x1BADB002


def _at(head: bytes, offset: int, magic: bytes) -> bool:
    return head[offset : offset + len(magic)] == magic


def _multiboot(head: bytes) -> bool:
    for offset in range(0, min(len(head), KERNEL_HEAD_BYTES) - 11, 4):
        magic, flags, checksum = struct.unpack_from("<III", head, offset)
        if magic == _MULTIBOOT_MAGIC and (magic + flags + checksum) & 0xFFFFFFFF == 0:
            return True
    return False


def kernel_format(head: bytes) -> str | None:
    """The image format that `head` (a file's first KERNEL_HEAD_BYTES) announces, or None."""
    if head.startswith(_ELF):
        return "elf"
    if _at(head, *_BZIMAGE_FLAG) and _at(head, *_BZIMAGE_MAGIC):
        return "bzimage"
    if _at(head, *_ARM64_MAGIC):
        return "arm64-image"
    if _multiboot(head):
        return "multiboot"
    return None


def check_kernel_head(head: bytes, field: str, code: ErrorCode = ErrorCode.INVALID_ARGUMENT) -> None:
    """Refuse a file that is no kernel image with reason KERNEL_INVALID, naming the field (`code`:
    INVALID_ARGUMENT for a request's input, FAILED_PRECONDITION for a stored VM's)."""
    if kernel_format(head) is None:
        message = f"{field}: not a kernel image (neither ELF, bzImage, arm64 Image nor Multiboot)"
        raise kernel_invalid(field, message, code)
