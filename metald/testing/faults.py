"""Failure injection and gates shared by the fakes, keyed by operation name ("start", "detach")."""

from __future__ import annotations

import asyncio
from collections import defaultdict


class Faults:
    def __init__(self) -> None:
        self._errors: dict[str, list[BaseException]] = defaultdict(list)
        self._always: dict[str, BaseException] = {}
        self._gates: dict[str, asyncio.Event] = {}
        self.entered: dict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self.calls: dict[str, int] = defaultdict(int)

    def fail(self, operation: str, error: BaseException, *, times: int = 1) -> None:
        """The next `times` calls of `operation` raise `error` (0: every call until `clear`)."""
        if times == 0:
            self._always[operation] = error
        else:
            self._errors[operation].extend([error] * times)

    def clear(self, operation: str) -> None:
        self._errors.pop(operation, None)
        self._always.pop(operation, None)

    def hold(self, operation: str) -> asyncio.Event:
        """Calls of `operation` wait (after `entered[operation]` is set) until the event is set."""
        gate = self._gates[operation] = asyncio.Event()
        return gate

    async def step(self, operation: str) -> None:
        """Called first by every fake operation: count it, wait at its gate, raise its fault."""
        self.calls[operation] += 1
        self.entered[operation].set()
        gate = self._gates.get(operation)
        if gate is not None:
            await gate.wait()
        if operation in self._always:
            raise self._always[operation]
        if self._errors.get(operation):
            raise self._errors[operation].pop(0)
