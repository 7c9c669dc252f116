"""The kernel header check (metald/domain/kernel_image.py): what a VMM can load passes, text and
random bytes are KERNEL_INVALID with the code the caller asks for."""

from __future__ import annotations

import os
import struct

import pytest

from metald.domain.errors import ErrorCode, MetaldError
from metald.domain.kernel_image import KERNEL_HEAD_BYTES, check_kernel_head, kernel_format


def _bzimage() -> bytes:
    head = bytearray(KERNEL_HEAD_BYTES)
    head[0:2] = b"MZ"  # an EFI-stub kernel starts like a PE file
    head[0x1FE:0x200] = b"\x55\xaa"
    head[0x202:0x206] = b"HdrS"
    return bytes(head)


def _multiboot(offset: int) -> bytes:
    magic, flags = 0x1BADB002, 0x00010003
    head = bytearray(KERNEL_HEAD_BYTES)
    head[offset : offset + 12] = struct.pack("<III", magic, flags, (-(magic + flags)) & 0xFFFFFFFF)
    return bytes(head)


def _arm64() -> bytes:
    head = bytearray(128)
    head[0x38:0x3C] = b"ARM\x64"
    return bytes(head)


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"\x7fELF\x02\x01\x01" + bytes(100), "elf"),
        (_bzimage(), "bzimage"),
        (_arm64(), "arm64-image"),
        (_multiboot(0), "multiboot"),
        (_multiboot(4096), "multiboot"),
    ],
)
def test_kernel_images_are_recognised(head: bytes, expected: str) -> None:
    assert kernel_format(head) == expected
    check_kernel_head(head, "config.boot.kernel_path")


@pytest.mark.parametrize(
    "head",
    [
        b"",
        b"#!/bin/sh\necho this is not a kernel\n" * 100,
        b"MZ this is not a kernel\n" * 1000,  # a PE header without the x86 boot protocol
        _bzimage()[:0x202],  # truncated before the magic
        _multiboot(0).replace(b"\x02\xb0\xad\x1b", b"\x02\xb0\xad\x1c"),  # a wrong magic
        _multiboot(2),  # not 4-aligned
        bytes(KERNEL_HEAD_BYTES),
    ],
)
@pytest.mark.parametrize("code", [ErrorCode.INVALID_ARGUMENT, ErrorCode.FAILED_PRECONDITION])
def test_anything_else_is_kernel_invalid(head: bytes, code: ErrorCode) -> None:
    assert kernel_format(head) is None
    with pytest.raises(MetaldError) as caught:
        check_kernel_head(head, "config.boot.kernel_path", code)
    error = caught.value
    assert (error.code, error.reason) == (code, "KERNEL_INVALID")
    assert error.message.startswith("config.boot.kernel_path: ") and error.metadata == {
        "field": "config.boot.kernel_path"
    }


def test_random_bytes_are_refused() -> None:
    rejected = sum(kernel_format(os.urandom(KERNEL_HEAD_BYTES)) is None for _ in range(200))
    assert rejected >= 199  # a 1 in 2^32 chance per try of ELF's magic, say
