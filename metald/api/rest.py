"""REST over the RPCs: `/v1/vms...` requests become Connect-JSON calls to the very same ASGI app,
so auth (before the body is parsed), validation, errors, metrics, logs and traces are the RPCs'
own. Path and query parameters are folded into the request JSON; the proto decoder remains the
only judge of types and unknown fields (so `bytes` travel base64 in JSON, as in Connect). Plus `GET /v1/vms/{vm_id}/console`, the one route that is
not an RPC: a VM's console log, owner-checked, read from an offset.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote

# The wire form of a Connect error (code, message, details with ErrorInfo), so errors raised here
# look exactly like those of the RPCs. connectrpc is pinned in pyproject.toml.
from connectrpc._protocol import ConnectWireError
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from protobuf import (
    DescEnum,
    DescFieldValueEnum,
    DescFieldValueList,
    DescFieldValueScalar,
    DescMessage,
    ScalarType,
)

from metald.api.asgi import ASGIApp, Receive, Scope, Send, headers_of, read_body, send_bytes
from metald.api.auth import Authenticator, current_peer
from metald.api.errors import to_connect_error
from metald.domain.errors import MetaldError, invalid
from metald.gen.vmprovisioner.v1.vm_connect import VmService as VmServiceDesc
from metald.usecases import VmUseCases

SERVICE = VmServiceDesc.desc()
CONSOLE_MAX_CHUNK = 4 << 20
_INTEGERS = frozenset(
    {
        ScalarType.INT32,
        ScalarType.INT64,
        ScalarType.UINT32,
        ScalarType.UINT64,
        ScalarType.SINT32,
        ScalarType.SINT64,
        ScalarType.FIXED32,
        ScalarType.FIXED64,
        ScalarType.SFIXED32,
        ScalarType.SFIXED64,
    }
)
# Request headers that describe the REST body, not the JSON body sent on.
_DROPPED_HEADERS = frozenset({b"content-type", b"content-length", b"content-encoding", b"transfer-encoding"})


@dataclass(frozen=True)
class RestRoute:
    """`rpc` is the VmService method the route calls; None for the console (served here)."""

    method: str
    template: str
    rpc: str | None
    body: bool
    summary: str
    tag: str = "VMs"

    @property
    def pattern(self) -> re.Pattern[str]:
        parts = re.split(r"\{(\w+)\}", self.template)
        regex = "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>[^/]+?)" for i, p in enumerate(parts))
        return re.compile(f"^{regex}$")

    @property
    def path_params(self) -> list[str]:
        return re.findall(r"\{(\w+)\}", self.template)


_VERBS = (
    ("boot", "BootVm", "Boot a CREATED or SHUTDOWN VM"),
    ("pause", "PauseVm", "Pause a RUNNING VM"),
    ("resume", "ResumeVm", "Resume a PAUSED VM"),
    ("reboot", "RebootVm", "Reboot a RUNNING VM"),
    ("shutdown", "ShutdownVm", "Shut down a RUNNING or PAUSED VM"),
)
ROUTES: tuple[RestRoute, ...] = (
    RestRoute("GET", "/v1/vms", "ListVms", False, "List the caller's VMs"),
    RestRoute("POST", "/v1/vms", "CreateVm", True, "Create a VM"),
    RestRoute("GET", "/v1/vms/{vm_id}", "GetVmInfo", False, "Describe a VM"),
    RestRoute("DELETE", "/v1/vms/{vm_id}", "DeleteVm", False, "Delete a VM"),
    *(RestRoute("POST", f"/v1/vms/{{vm_id}}:{verb}", rpc, True, summary) for verb, rpc, summary in _VERBS),
    RestRoute("GET", "/v1/vms/{vm_id}/console", None, False, "Read a VM's console output"),
    RestRoute("POST", "/v1/vms/{vm_id}:exec", "ExecVm", True, "Run a command in a RUNNING VM's guest"),
    RestRoute("GET", "/v1/vms/{vm_id}/files", "ReadFile", False, "Read a file of the guest (query: path)"),
    RestRoute("PUT", "/v1/vms/{vm_id}/files", "WriteFile", True, "Write a file into the guest"),
    RestRoute(
        "POST", "/v1/vms/{vm_id}:snapshot", "SnapshotVm", True, "Snapshot a RUNNING or PAUSED VM", "Snapshots"
    ),
    RestRoute("GET", "/v1/snapshots", "ListSnapshots", False, "List the caller's snapshots", "Snapshots"),
    RestRoute(
        "DELETE", "/v1/snapshots/{snapshot_id}", "DeleteSnapshot", False, "Delete a snapshot", "Snapshots"
    ),
)
_COMPILED = tuple((route, route.pattern) for route in ROUTES)


def input_of(rpc: str) -> DescMessage:
    return next(m.input for m in SERVICE.methods if m.name == rpc)


def _field_kind(desc: DescMessage, name: str) -> tuple[str, bool]:
    """("bool" | "int" | "other", repeated) for a request field named in a query string; enums
    count as "int" (names stay strings, numbers become numbers)."""
    field = next((f for f in desc.fields if name in (f.name, f.json_name)), None)
    if field is None:
        return "other", False
    value = field.value
    repeated = isinstance(value, DescFieldValueList)
    element: object = value.element if isinstance(value, DescFieldValueList) else value
    if isinstance(element, DescEnum | DescFieldValueEnum):
        return "int", repeated
    if isinstance(element, DescFieldValueScalar):
        element = element.scalar
    if element is ScalarType.BOOL:
        return "bool", repeated
    return ("int" if element in _INTEGERS else "other"), repeated


def _query_value(kind: str, raw: str) -> Any:
    if kind == "bool" and raw in ("true", "false"):
        return raw == "true"
    if kind == "int" and re.fullmatch(r"-?[0-9]{1,20}", raw):
        return int(raw)
    return raw


def query_to_json(query: str, desc: DescMessage) -> dict[str, Any]:
    """`a=1&s=X&s=Y` -> {"a": 1, "s": ["X", "Y"]}, typed by the request message's fields."""
    out: dict[str, Any] = {}
    for name, values in parse_qs(query, keep_blank_values=True, errors="replace").items():
        kind, repeated = _field_kind(desc, name)
        converted = [_query_value(kind, v) for v in values]
        out[name] = converted if repeated else converted[-1]
    return out


def request_json(route: RestRoute, params: dict[str, str], query: str, body: bytes) -> bytes:
    """The Connect JSON body for a route's RPC. A body that is not a JSON object is passed on as
    is, for the RPC to refuse after authenticating the caller."""
    assert route.rpc is not None
    if not route.body:
        return json.dumps({**query_to_json(query, input_of(route.rpc)), **params}).encode()
    if not params:
        return body
    try:
        message = json.loads(body or b"{}")
    except ValueError:
        return body
    if not isinstance(message, dict):
        return body
    return json.dumps({**message, **params}).encode()


async def send_error(
    send: Send, error: ConnectError, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    wire = ConnectWireError.from_exception(error)
    await send_bytes(send, wire.to_http_status().code, wire.to_json_bytes(), "application/json", headers)


def _int_param(query: dict[str, list[str]], name: str, default: int, low: int, high: int) -> int:
    raw = query.get(name, [str(default)])[-1]
    if not re.fullmatch(r"[0-9]{1,19}", raw) or not low <= int(raw) <= high:
        raise invalid(name, f"must be an integer in [{low}, {high}]")
    return int(raw)


@dataclass(frozen=True, kw_only=True)
class RestApi:
    rpc_app: ASGIApp
    authenticator: Authenticator
    usecases: VmUseCases
    max_request_bytes: int

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw_path = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1").split("?")[0]
        matches = [(route, m) for route, pattern in _COMPILED if (m := pattern.match(raw_path))]
        if not matches:
            await send_error(send, ConnectError(Code.NOT_FOUND, f"no such endpoint: {scope['path']}"))
            return
        chosen = next(((r, m) for r, m in matches if r.method == scope["method"]), None)
        if chosen is None:
            allow = ", ".join(sorted({r.method for r, _ in matches}))
            await send_bytes(
                send,
                405,
                json.dumps(
                    {"code": "unimplemented", "message": f"method not allowed; allowed: {allow}"}
                ).encode(),
                "application/json",
                [(b"allow", allow.encode())],
            )
            return
        route, match = chosen
        params = {k: unquote(v, errors="replace") for k, v in match.groupdict().items()}
        query = scope.get("query_string", b"").decode("latin-1")
        if route.rpc is None:
            await self._serve_console(scope, send, params["vm_id"], query)
            return
        body = b""
        if route.body:
            read = await read_body(receive, self.max_request_bytes)
            if read is None:
                await send_error(send, ConnectError(Code.RESOURCE_EXHAUSTED, "request body too large"))
                return
            body = read
        await self._forward(scope, receive, send, route.rpc, request_json(route, params, query, body))

    async def _forward(self, scope: Scope, receive: Receive, send: Send, rpc: str, body: bytes) -> None:
        path = f"/{SERVICE.type_name}/{rpc}"
        headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() not in _DROPPED_HEADERS]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        inner = {
            **scope,
            "method": "POST",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "headers": headers,
        }
        delivered = False

        async def receive_body() -> Any:
            nonlocal delivered
            if delivered:
                return await receive()  # the client's disconnect, if it goes away
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.rpc_app(inner, receive_body, send)

    async def _serve_console(self, scope: Scope, send: Send, vm_id: str, query: str) -> None:
        try:
            customer = self.authenticator.authenticate(headers_of(scope), current_peer.get())
            params = parse_qs(query, keep_blank_values=True)
            offset = _int_param(params, "offset", 0, 0, 1 << 62)
            limit = _int_param(params, "limit", 1 << 20, 1, CONSOLE_MAX_CHUNK)
            chunk = await self.usecases.read_console(customer, vm_id, offset, limit)
        except MetaldError as exc:
            await send_error(send, to_connect_error(exc))
            return
        await send_bytes(
            send,
            200,
            chunk.data,
            "application/octet-stream",
            [
                (b"x-console-offset", str(chunk.next_offset).encode()),
                (b"x-console-size", str(chunk.size).encode()),
                (b"cache-control", b"no-store"),
            ],
        )
