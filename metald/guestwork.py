"""The use cases that work inside a guest: ExecVm, WriteFile, ReadFile.

Each one checks the caller owns the VM and that it is RUNNING, checks the request against the
agent's limits (so a refusal names the field before anything reaches the guest), then asks the
guest agent (metald.ports.GuestAgent). Decisions: docs/agent.md.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

from metald.agent.protocol import MAX_DATA
from metald.domain import ids
from metald.domain.errors import (
    ErrorCode,
    MetaldError,
    invalid,
    precondition,
    refusal,
)
from metald.domain.model import NicAddress, Vm
from metald.domain.ownership import owned_vm
from metald.domain.states import VmState
from metald.ports import GuestAgent, VmRecords
from metald.usecases import ExecCommand, ExecResult, GuestFile

MAX_PATH = 4096
MAX_ARGS = 4096  # argv entries, and env entries (the agent's limit)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _too_large(field: str, size: int) -> MetaldError:
    return refusal(
        ErrorCode.INVALID_ARGUMENT,
        "FILE_TOO_LARGE" if field == "content" else "INVALID_FIELD",
        f"{field}: {size} bytes is more than the limit of {MAX_DATA} bytes (16 MiB)",
        field=field,
        limit_bytes=str(MAX_DATA),
    )


def _check_path(path: str, field: str = "path") -> None:
    if not path.startswith("/") or "\0" in path or len(path.encode()) > MAX_PATH:
        raise invalid(field, f"must be an absolute guest path without NUL, at most {MAX_PATH} bytes")


def _check_command(command: ExecCommand) -> None:
    if not command.argv or not command.argv[0]:
        raise invalid("command", "must name the program to run (argv[0])")
    if len(command.argv) > MAX_ARGS or any("\0" in arg for arg in command.argv):
        raise invalid("command", f"at most {MAX_ARGS} arguments, none containing NUL")
    if len(command.env) > MAX_ARGS:
        raise invalid("env", f"at most {MAX_ARGS} entries")
    for name, value in command.env.items():
        if not _ENV_NAME.fullmatch(name) or "\0" in value:
            raise invalid("env", f"{name!r}: names are [A-Za-z_][A-Za-z0-9_]*, values without NUL")
    if command.working_dir:
        _check_path(command.working_dir, "working_dir")
    if len(command.stdin) > MAX_DATA:
        raise _too_large("stdin", len(command.stdin))


CLONE_ENTROPY_BYTES = 256


class GuestWork:
    """ExecVm / WriteFile / ReadFile over the store (ownership, state) and the guest agent."""

    def __init__(
        self, store: VmRecords, agent: GuestAgent, *, default_timeout: float, max_timeout: float
    ) -> None:
        self._store = store
        self._agent = agent
        self._default_timeout = default_timeout
        self._max_timeout = max_timeout

    async def _running(self, customer_id: str, vm_id: str, operation: str) -> Vm:
        vm = owned_vm(await self._store.get(ids.check_vm_id(vm_id)), vm_id, customer_id)
        if vm.state is not VmState.RUNNING:
            raise precondition(
                "INVALID_STATE",
                f"cannot {operation} in VM {vm_id} in state {vm.state.api_name}; it must be RUNNING",
                vm_id=vm_id,
                current_state=vm.state.api_name,
                operation=operation,
            )
        return vm

    async def exec(self, customer_id: str, vm_id: str, command: ExecCommand) -> ExecResult:
        _check_command(command)
        if command.timeout_seconds < 0 or command.timeout_seconds > self._max_timeout:
            raise invalid(
                "timeout_seconds", f"must be 0 (default {self._default_timeout:g}) to {self._max_timeout:g}"
            )
        await self._running(customer_id, vm_id, "exec")
        return await self._agent.exec(vm_id, command, command.timeout_seconds or self._default_timeout)

    async def write_file(self, customer_id: str, vm_id: str, path: str, content: bytes, mode: int) -> None:
        _check_path(path)
        if len(content) > MAX_DATA:
            raise _too_large("content", len(content))
        if mode < 0 or mode > 0o7777:
            raise invalid("mode", "permission bits 0 to 07777 (0: 0644)")
        await self._running(customer_id, vm_id, "write a file")
        await self._agent.write_file(vm_id, path, content, mode or 0o644)

    async def read_file(self, customer_id: str, vm_id: str, path: str) -> GuestFile:
        _check_path(path)
        await self._running(customer_id, vm_id, "read a file")
        return await self._agent.read_file(vm_id, path)

    async def refresh_clone(self, vm_id: str, nics: Sequence[NicAddress], *, timeout: float) -> None:
        """A guest restored from a snapshot still has its source's wall clock (stale by the
        snapshot's age), entropy (every clone would read the same random bytes) and identity
        (hostname, vm_id, MACs, addresses): give it its own, once its agent answers."""
        await self._agent.refresh(vm_id, vm_id, nics, os.urandom(CLONE_ENTROPY_BYTES), timeout)
