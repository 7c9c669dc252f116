"""The one runner of host tools: how each failure is mapped."""

from __future__ import annotations

from pathlib import Path

import pytest

from metald.backends.vmm.tools import run_tool, tool_version
from metald.domain.errors import ErrorCode, MetaldError


async def test_a_missing_tool_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(MetaldError) as err:
        await run_tool([str(tmp_path / "qemu-img"), "create"], failure="x", reason="OVERLAY_FAILED")
    assert err.value.code is ErrorCode.UNAVAILABLE and err.value.reason == "HOST_TOOL_MISSING"
    assert (await tool_version(str(tmp_path / "qemu-img")))[0] is False


async def test_no_space_is_disk_full_and_the_partial_file_goes(tmp_path: Path) -> None:
    partial = tmp_path / "disk.tmp"
    partial.write_bytes(b"half")
    argv = ["sh", "-c", "echo 'write failed: No space left on device' >&2; exit 1"]
    with pytest.raises(MetaldError) as err:
        await run_tool(argv, failure="cannot copy", reason="DISK_COPY_FAILED", partial=partial)
    assert err.value.code is ErrorCode.RESOURCE_EXHAUSTED and err.value.reason == "DISK_FULL"
    assert not partial.exists()


async def test_other_failures_are_internal_with_the_tools_words() -> None:
    with pytest.raises(MetaldError) as err:
        await run_tool(
            ["sh", "-c", "echo broken >&2; exit 3"], failure="cannot copy", reason="DISK_COPY_FAILED"
        )
    assert err.value.code is ErrorCode.INTERNAL and err.value.reason == "DISK_COPY_FAILED"
    assert "broken" in err.value.message
