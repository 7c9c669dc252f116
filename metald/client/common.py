"""What the sync and async clients share: options, retries, argument coercion, REST replies."""

from __future__ import annotations

import dataclasses
import json
import os
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from connectrpc.code import Code
from connectrpc.protocol import ProtocolType
from pyqwest import FullResponse, HTTPVersion, ReadError, RemoteProtocolError, WriteError

from metald.client.errors import ApiError, api_error, from_http
from metald.gen.vmprovisioner.v1 import vm_pb as pb

DEFAULT_URL = "http://127.0.0.1:8080"
StateLike = pb.VmState | int | str
ConfigLike = pb.VmConfig | Mapping[str, Any] | None
PROTOCOLS = {"connect": ProtocolType.CONNECT, "grpc": ProtocolType.GRPC, "grpc-web": ProtocolType.GRPC_WEB}
# How a REST call (console, health) can fail below HTTP.
TRANSPORT_ERRORS = (OSError, TimeoutError, ReadError, WriteError, RemoteProtocolError)
# Extra time a call may take beyond what the server itself waits (boot wait, graceful shutdown).
_SLACK_SECONDS = 30.0
_SERVER_SHUTDOWN_DEFAULT = 30.0
_SERVER_BOOT_WAIT_DEFAULT = 60.0


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of idempotent reads (GetVmInfo, ListVms) on `retry_on` codes, with exponential
    backoff and full jitter. Writes are never retried: the first attempt may have taken effect."""

    attempts: int = 4
    initial_backoff: float = 0.1
    max_backoff: float = 2.0
    multiplier: float = 2.0
    retry_on: frozenset[Code] = frozenset({Code.UNAVAILABLE})

    def delays(self) -> Iterator[float]:
        """The pauses between attempts (attempts - 1 of them)."""
        ceiling = self.initial_backoff
        for _ in range(self.attempts - 1):
            yield random.uniform(0, ceiling)
            ceiling = min(ceiling * self.multiplier, self.max_backoff)


NO_RETRY = RetryPolicy(attempts=1)


@dataclass(frozen=True)
class Options:
    """Connection settings; url and token default to $METALD_URL and $METALD_TOKEN."""

    url: str = ""
    token: str = ""
    timeout: float = 60.0
    protocol: str = "connect"
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None

    def resolved(self) -> Options:
        url = (self.url or os.environ.get("METALD_URL") or DEFAULT_URL).rstrip("/")
        token = self.token or os.environ.get("METALD_TOKEN", "")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}")
        return dataclasses.replace(self, url=url, token=token)

    @property
    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token}"} if self.token else {}

    def transport_kwargs(self) -> dict[str, Any]:
        """For pyqwest's HTTPTransport / SyncHTTPTransport: cleartext HTTP/2 with prior knowledge
        (gRPC needs HTTP/2; one multiplexed connection), ALPN over TLS. Timeouts are per call."""
        kwargs: dict[str, Any] = {}
        if self.url.startswith("https://"):
            kwargs["tls_include_system_certs"] = self.tls_ca is None
            if self.tls_ca:
                kwargs["tls_ca_cert"] = self.tls_ca.read_bytes()
            if self.tls_cert and self.tls_key:
                kwargs["tls_cert"] = self.tls_cert.read_bytes()
                kwargs["tls_key"] = self.tls_key.read_bytes()
        else:
            kwargs["http_version"] = HTTPVersion.HTTP2
        return kwargs

    def console_url(self, vm_id: str, offset: int, limit: int) -> str:
        return self.url + console_path(vm_id, offset, limit)


def console_path(vm_id: str, offset: int, limit: int) -> str:
    return f"/v1/vms/{quote(vm_id, safe='')}/console?offset={offset}&limit={limit}"


def state(value: StateLike) -> pb.VmState:
    """pb.VmState from a VmState, its number, or a name: "running", "RUNNING", "VM_STATE_RUNNING"."""
    if isinstance(value, pb.VmState):
        return value
    if isinstance(value, int):
        return pb.VmState(value)
    name = value.strip().upper().removeprefix("VM_STATE_")
    try:
        return pb.VmState[name]
    except KeyError:
        names = ", ".join(s.name.lower() for s in pb.VmState if s.value)
        raise ValueError(f"unknown state {value!r}; one of {names}") from None


def state_name(value: pb.VmState | int) -> str:
    return f"VM_STATE_{pb.VmState(value).name}"


def config(value: ConfigLike) -> pb.VmConfig:
    """A VmConfig from a message or a dict in the reference's JSON (snake_case or camelCase)."""
    if value is None:
        return pb.VmConfig()
    if isinstance(value, pb.VmConfig):
        return value
    return pb.VmConfig.from_json(json.dumps(dict(value)))


def boot_timeout(wait_for_ready: bool, wait_timeout_seconds: int, default: float) -> float:
    if not wait_for_ready:
        return default
    return max(default, (wait_timeout_seconds or _SERVER_BOOT_WAIT_DEFAULT) + _SLACK_SECONDS)


def shutdown_timeout(force: bool, timeout_seconds: int, default: float) -> float:
    if force:
        return default
    return max(default, (timeout_seconds or _SERVER_SHUTDOWN_DEFAULT) + _SLACK_SECONDS)


@dataclass(frozen=True)
class ConsoleChunk:
    """Console bytes from an offset; `offset` is where the next read starts."""

    data: bytes
    offset: int
    size: int


def console_chunk(response: FullResponse, offset: int) -> ConsoleChunk:
    if response.status != 200:
        raise from_http(response.status, response.content)
    content = response.content
    return ConsoleChunk(
        content,
        int(response.headers.get("x-console-offset") or offset + len(content)),
        int(response.headers.get("x-console-size") or 0),
    )


def health_body(response: FullResponse) -> dict[str, Any]:
    """The /health JSON, for 200 and 503 alike (503 is a status, not a failure to ask)."""
    try:
        body = json.loads(response.content)
    except ValueError:
        raise from_http(response.status, response.content) from None
    if not isinstance(body, dict) or "status" not in body:
        raise from_http(response.status, response.content)
    return body


def unavailable(exc: Exception) -> ApiError:
    """A transport failure (connection refused, reset, timeout) as an UNAVAILABLE ApiError."""
    return api_error(Code.UNAVAILABLE, f"{type(exc).__name__}: {exc}")


def exec_timeout(timeout_seconds: int, default: float) -> float:
    """How long an ExecVm call may take: the command's timeout (0: the daemon's, up to its 60 s
    default) plus a margin for the answer."""
    return max(default, float(timeout_seconds or 60) + 15.0)
