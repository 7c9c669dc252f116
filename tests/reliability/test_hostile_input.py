"""Hostile input: malformed, mistyped, truncated, oversized, deeply nested and badly encoded requests
at every RPC, over Connect (JSON, protobuf, GET), gRPC-Web and gRPC.

Every answer must be a deliberate one: a Connect error other than internal/unknown/data_loss/
unavailable (deadline_exceeded only when the request set a timeout), a gRPC status other than
UNKNOWN/INTERNAL/UNAVAILABLE/DATA_LOSS, or an HTTP status below 500 (501 for an unsupported
compression is Connect's own answer), within the client's timeout (no hang), and the daemon must
not die. The one exemption: INTERNAL for a compressed frame sent without a declared compression,
which gRPC and Connect prescribe. After each fuzz test the daemon is healthy (GET /health 200) and
still serves valid requests. The plain tests before the fuzz pin down inputs the fuzz found to break
the daemon (docs/reliability.md, "Bugs and findings").

Two customers keep the fuzz from booting guests: CreateVm is sent as one (its random configs may
succeed), every other RPC as the other, which owns just one CREATED VM and never sees those.
Examples per test: METALD_RELIABILITY_FUZZ_EXAMPLES (CI 120, long form 3000); hypothesis is
derandomized (same examples every run) in the CI form and random in the long form.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import json
import socket
import string
import struct
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import grpc
import h2.config
import h2.connection
import h2.events
import h2.exceptions
import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, reject, settings
from hypothesis import strategies as st

from metald.gen.vmprovisioner.v1 import vm_pb as pb
from tests.reliability.common import LONG, knob
from tests.reliability.conftest import own_daemon
from tests.support.daemon import Daemon
from tests.support.rpc import SERVICE, Rpc, token

pytestmark = pytest.mark.reliability

EXAMPLES = knob("FUZZ_EXAMPLES", 120, 3000)
TIMEOUT = 20.0  # seconds; no fuzz request makes the daemon wait for a guest
METHODS = (
    "CreateVm",
    "DeleteVm",
    "BootVm",
    "ShutdownVm",
    "PauseVm",
    "ResumeVm",
    "RebootVm",
    "GetVmInfo",
    "ListVms",
)
REQUESTS: dict[str, Any] = {m: getattr(pb, f"{m}Request") for m in METHODS}
CREATOR, OPERATOR, OTHER = "fz-create", "fz-ops", "fz-other"
OWNED, FOREIGN = "fz-owned", "fz-foreign"  # a CREATED VM of OPERATOR's, one of OTHER's
BAD_CODES = {"internal", "unknown", "data_loss", "unavailable"}
FUZZ = settings(
    max_examples=EXAMPLES,
    # no shrinking: a failing input is reported as found (shrinking one that kills the daemon
    # would restart it dozens of times)
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    deadline=None,
    derandomize=not LONG,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)


def customer_for(method: str) -> str:
    return CREATOR if method == "CreateVm" else OPERATOR


@dataclass(frozen=True)
class Case:
    """One raw HTTP request at an RPC."""

    method: str
    body: bytes
    content_type: str | None = "application/json"
    headers: tuple[tuple[bytes, bytes], ...] = ()
    http_method: str = "POST"
    query: tuple[tuple[str, str], ...] = ()
    auth: bytes | None = b""  # b"": the method's customer's dev token; None: no header

    def __repr__(self) -> str:
        head = [(k[:40], v[:80] + (b"..." if len(v) > 80 else b"")) for k, v in self.headers]
        body = self.body[:160] + (b"..." if len(self.body) > 160 else b"")
        return (
            f"Case({self.http_method} {self.method} ct={self.content_type!r} auth={(self.auth or b'')[:60]!r} "
            f"headers={head} ({sum(len(v) for _, v in self.headers)} bytes) query={self.query!r} "
            f"body[{len(self.body)}]={body!r})"
        )

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        """How hypothesis prints a failing example: the short repr, not megabytes of body."""
        printer.text(repr(self))

    @property
    def compressed_frame(self) -> bool:
        """An enveloped body (gRPC, gRPC-Web, Connect streaming) whose first frame has the compressed flag
        but no compression declared: gRPC and Connect prescribe INTERNAL for it."""
        ct, body = self.content_type or "", self.body
        if "grpc-web-text" in ct:
            body = base64.b64decode(body + b"==", validate=False)
        return (
            ct.startswith(("application/grpc", "application/connect+"))
            and body[:1] != b""
            and body[0] & 1 == 1
        )

    @property
    def sets_timeout(self) -> bool:
        return any(k.lower() in (b"connect-timeout-ms", b"grpc-timeout") for k, _ in self.headers)

    def http_headers(self) -> list[tuple[bytes, bytes]]:
        out = list(self.headers)
        if self.content_type is not None:
            out.append((b"content-type", self.content_type.encode("latin-1")))
        if self.auth == b"":
            out.append((b"authorization", f"Bearer {token(customer_for(self.method))}".encode()))
        elif self.auth is not None:
            out.append((b"authorization", self.auth))
        return out


@dataclass
class Target:
    """The daemon under fire, with the checks every answer must pass."""

    daemon: Daemon
    http: httpx.Client = field(init=False)
    sent: int = 0

    def __post_init__(self) -> None:
        self.http = client(self.daemon.url)

    def revive(self, grace: float = 0.0) -> str:
        """'' if the daemon runs (still, after `grace` seconds); else restart it and say how it died."""
        assert self.daemon.proc is not None
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.daemon.proc.wait(grace)
        if self.daemon.proc.poll() is None:
            return ""
        died = f"the daemon died (exit status {self.daemon.proc.returncode}); log tail:\n{self.daemon.logs()[-600:]}"
        self.daemon.start()
        self.http.close()
        self.http = client(self.daemon.url)
        return died

    def send(self, case: Case) -> httpx.Response:
        self.sent += 1
        try:
            # percent-encoded by hand: lone surrogates become invalid UTF-8, on purpose
            query = urlencode(case.query, encoding="utf-8", errors="surrogatepass")
            resp = self.http.request(
                case.http_method,
                f"/{SERVICE}/{case.method}" + (f"?{query}" if query else ""),
                content=case.body,
                headers=case.http_headers(),
            )
        except httpx.LocalProtocolError:
            reject()  # the client cannot even send it (h11 refuses such a header)
        except httpx.TimeoutException:
            died = self.revive(2)
            raise AssertionError(f"no answer within {TIMEOUT:g}s (hang) {died}") from None
        except httpx.TransportError as exc:
            died = self.revive(2)
            raise AssertionError(f"connection dropped without an answer ({exc!r}) {died}") from None
        died = self.revive()
        assert not died, died
        return resp

    def check(self, case: Case) -> httpx.Response:
        resp = self.send(case)
        code = connect_code(resp)
        if code is not None:
            if code == "internal" and case.compressed_frame and "compress" in resp.text:
                return resp
            assert code not in BAD_CODES, f"{resp.status_code} {resp.text[:300]}"
            assert code != "deadline_exceeded" or case.sets_timeout, resp.text[:300]
        elif resp.headers.get("content-type", "").startswith("application/grpc"):
            status = grpc_web_status(resp)
            if status == 13 and case.compressed_frame and b"compress" in resp.content:
                return resp  # gRPC's prescribed answer to a compressed frame without grpc-encoding
            assert status not in (2, 13, 14, 15), f"grpc-status {status}: {resp.text[:300]!r}"
        else:
            assert resp.status_code < 500 or resp.status_code == 501, f"{resp.status_code} {resp.text[:300]}"
        return resp

    def still_serves(self) -> None:
        """GET /health is 200 and a valid request of each kind works."""
        assert not self.revive()
        health = httpx.get(f"{self.daemon.url}/health", timeout=10)
        assert health.status_code == 200 and health.json()["status"] in ("healthy", "degraded"), health.text
        rpc = Rpc(self.daemon.url, OPERATOR)
        assert rpc.info(OWNED)["state"] == "VM_STATE_CREATED"
        probe = rpc.create(vm_id="fz-probe")
        assert rpc.ok("ListVms", {"page_size": 1000})["total_count"] >= 2
        assert rpc.ok("DeleteVm", {"vm_id": probe}) == {"success": True}
        rpc.client.close()


def client(url: str) -> httpx.Client:
    """A new connection for every request: a dropped connection is the fault of that request."""
    return httpx.Client(base_url=url, timeout=TIMEOUT, limits=httpx.Limits(max_keepalive_connections=0))


def connect_code(resp: httpx.Response) -> str | None:
    if not resp.headers.get("content-type", "").startswith("application/json") or resp.status_code == 200:
        return None
    try:
        body = resp.json()
    except ValueError:
        return None
    return str(body["code"]) if isinstance(body, dict) and "code" in body else None


def grpc_web_status(resp: httpx.Response) -> int | None:
    """grpc-status from the headers (trailers-only) or the body's trailer frame."""
    if "grpc-status" in resp.headers:
        return int(resp.headers["grpc-status"])
    data = resp.content
    while len(data) >= 5:
        flags, length = data[0], struct.unpack(">I", data[1:5])[0]
        frame, data = data[5 : 5 + length], data[5 + length :]
        if flags & 0x80:
            for line in frame.decode(errors="replace").split("\r\n"):
                if line.lower().startswith("grpc-status:"):
                    return int(line.split(":", 1)[1])
    return None


# ---- strategies -----------------------------------------------------------------------------------

INT32 = st.integers(-(2**31), 2**31 - 1)
INT64 = st.integers(-(2**63), 2**63 - 1)
ANY_INT = st.one_of(INT32, INT64, st.integers(), st.sampled_from([0, -1, 1, 2**31, 2**53 + 1, 2**64]))
TEXT = st.one_of(
    st.text(max_size=40),
    st.text(st.characters(codec="utf-8"), max_size=300),
    st.sampled_from(
        [
            "",
            " ",
            "\x00",
            "..",
            "../../etc/passwd",
            "/assets/",
            "/assets/vmlinux",
            "/etc/shadow",
            "a" * 65,
            "a" * 5000,
            "T2",
            "TAP",
            "auto",
            "SERIAL",
            "VIRTIO_CONSOLE",
            "x.log",
            "vmm.log",
            "ff:ff:ff:ff:ff:ff",
            "01:00:5e:00:00:01",
            "10.0.0.1",
            "::1",
            "fd00::1",
            "0.0.0.0",
            "-1",
            "1e999",
            "NaN",
            "\ud800",
        ]
    ),
)
SCALAR = st.one_of(st.none(), st.booleans(), ANY_INT, st.floats(allow_nan=False), TEXT)
ANY_JSON = st.recursive(
    SCALAR,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(TEXT, inner, max_size=4)),
    max_leaves=12,
)
VM_IDS = st.one_of(
    st.sampled_from([OWNED, FOREIGN, "", "vm_0", "a" * 64, "a" * 65, "../x", "fz owned"]), TEXT
)


def maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly the expected type, sometimes any JSON value instead."""
    return st.one_of(strategy, strategy, strategy, ANY_JSON)


def obj(**fields_: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """A JSON object with any subset of these fields (and sometimes an unknown one)."""
    return st.fixed_dictionaries({}, optional={k: maybe(v) for k, v in fields_.items()}).flatmap(
        lambda d: st.one_of(st.just(d), st.dictionaries(TEXT, ANY_JSON, max_size=2).map(lambda x: {**x, **d}))
    )


IPV4 = obj(address=TEXT, prefix_length=ANY_INT, gateway=TEXT)
NICS = st.lists(
    obj(
        interface_id=TEXT,
        type=TEXT,
        guest_mac=TEXT,
        host_ipv4=IPV4,
        guest_ipv4=IPV4,
        host_ipv6=IPV4,
        guest_ipv6=IPV4,
        rate_limit=obj(bandwidth_bytes_per_second=ANY_INT, burst_bytes=ANY_INT, refill_time_millis=ANY_INT),
    ),
    max_size=12,
)
CONFIG = obj(
    cpu=obj(vcpu_count=ANY_INT, cpu_template=TEXT),
    memory=obj(size_bytes=st.one_of(ANY_INT, ANY_INT.map(str))),
    boot=obj(kernel_path=TEXT, kernel_args=TEXT, initrd_path=TEXT),
    storage=st.lists(
        obj(device_id=TEXT, path_on_host=TEXT, is_read_only=st.booleans(), is_root_device=st.booleans()),
        max_size=20,
    ),
    network=NICS,
    console=obj(type=TEXT, output_file=TEXT),
    metadata=st.one_of(
        st.dictionaries(TEXT, TEXT, max_size=8),
        st.dictionaries(st.text(max_size=300), st.text(max_size=3000), min_size=60, max_size=200),
    ),
)
STATES = st.one_of(
    st.integers(-3, 8), INT32, st.sampled_from(["VM_STATE_RUNNING", "VM_STATE_UNSPECIFIED", "RUNNING", "x"])
)
FIELDS: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "CreateVm": obj(vm_id=VM_IDS, config=CONFIG, customer_id=st.one_of(TEXT, st.just(CREATOR))),
    # never OPERATOR's own VM: that one is to stay (and BootVm would really boot it)
    "DeleteVm": obj(vm_id=VM_IDS.filter(lambda v: v != OWNED), force=st.booleans()),
    "BootVm": obj(
        vm_id=VM_IDS.filter(lambda v: v != OWNED), wait_for_ready=st.booleans(), wait_timeout_seconds=ANY_INT
    ),
    "ShutdownVm": obj(vm_id=VM_IDS, force=st.booleans(), timeout_seconds=ANY_INT),
    "PauseVm": obj(vm_id=VM_IDS),
    "ResumeVm": obj(vm_id=VM_IDS),
    "RebootVm": obj(vm_id=VM_IDS, force=st.booleans()),
    "GetVmInfo": obj(vm_id=VM_IDS),
    "ListVms": obj(state_filter=st.lists(STATES, max_size=6), page_size=ANY_INT, page_token=TEXT),
}
METHOD = st.sampled_from(METHODS)


def to_json(value: Any) -> bytes:
    """JSON text as bytes; lone surrogates become invalid UTF-8 on purpose."""
    return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")


@st.composite
def request_values(draw: st.DrawFn) -> tuple[str, Any]:
    """(method, a JSON value for its request): right fields with random values, or anything."""
    method = draw(METHOD)
    value = draw(st.one_of(FIELDS[method], FIELDS[method], ANY_JSON))
    return method, value


def deep(depth: int, kind: str) -> bytes:
    if kind == "array":
        return b"[" * depth + b"]" * depth
    if kind == "object":
        return b'{"a":' * depth + b"1" + b"}" * depth
    return b'{"config":{"metadata":' + b'{"a":' * depth + b"1" + b"}" * depth + b"}}"


DEPTHS = st.one_of(
    st.integers(1, 2000), st.integers(2000, 200_000), st.sampled_from([999, 1000, 1001, 100_000])
)


@st.composite
def mangled(draw: st.DrawFn, data: bytes) -> bytes:
    """data truncated, with bytes flipped, inserted or deleted."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["truncate", "flip", "insert", "delete"]))
        at = draw(st.integers(0, len(out)))
        if op == "truncate":
            del out[at:]
        elif op == "flip" and at < len(out):
            out[at] ^= draw(st.integers(1, 255))
        elif op == "insert":
            out[at:at] = draw(
                st.sampled_from(
                    [
                        b"\xff",
                        b"\xc3",
                        b"\xed\xa0\x80",
                        b"\x00",
                        b"\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01",
                        b'"',
                        b"{",
                        b"]",
                    ]
                )
            )
        elif op == "delete":
            del out[at : at + draw(st.integers(1, 8))]
    return bytes(out)


@st.composite
def json_cases(draw: st.DrawFn) -> Case:
    method, value = draw(request_values())
    kind = draw(st.sampled_from(["fields", "fields", "mangled", "deep", "raw"]))
    if kind == "fields":
        body = to_json(value)
    elif kind == "mangled":
        body = draw(mangled(to_json(value)))
    elif kind == "deep":
        body = deep(draw(DEPTHS), draw(st.sampled_from(["array", "object", "metadata"])))
    else:
        body = draw(st.binary(max_size=300))
    content_type = draw(
        st.sampled_from(
            ["application/json", "application/json; charset=utf-8", "application/json;charset=latin1"]
        )
    )
    return Case(method, body, content_type)


@st.composite
def wire(draw: st.DrawFn) -> bytes:
    """Raw protobuf wire format: fields of any number and wire type, lengths that may lie."""
    out = bytearray()
    for _ in range(draw(st.integers(0, 8))):
        number, wire_type = draw(st.integers(0, 2**29 + 5)), draw(st.integers(0, 7))
        out += varint((number << 3) | wire_type)
        if wire_type == 0:
            out += varint(draw(st.integers(0, 2**70)))
        elif wire_type == 1:
            out += draw(st.binary(min_size=0, max_size=8))
        elif wire_type == 2:
            payload = draw(st.binary(max_size=40))
            out += varint(draw(st.one_of(st.just(len(payload)), st.integers(0, 2**32)))) + payload
        elif wire_type == 5:
            out += draw(st.binary(min_size=0, max_size=4))
    return bytes(out)


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def encode(method: str, value: Any) -> bytes | None:
    """The request as protobuf, if the JSON value is a valid one."""
    try:
        return bytes(REQUESTS[method].from_json(json.dumps(value)).to_binary())
    except Exception:
        return None


@st.composite
def proto_cases(draw: st.DrawFn) -> Case:
    method, value = draw(request_values())
    valid = encode(method, value) or b""
    kind = draw(st.sampled_from(["valid", "mangled", "mangled", "wire", "groups", "oversized", "bytes"]))
    if kind == "valid":
        body = valid
    elif kind == "mangled":
        body = draw(mangled(valid + draw(wire())))
    elif kind == "wire":
        body = draw(wire())
    elif kind == "groups":  # nested start-group tags, closed or not
        n = draw(DEPTHS)
        body = b"\x13" * n + (b"\x14" * n if draw(st.booleans()) else b"")
    elif kind == "oversized":  # just over and far over the 1 MiB request limit
        body = valid + b"\x1a" + varint(1 << 20) + b"\x00" * (draw(st.sampled_from([1, 1 << 20])) + (1 << 20))
    else:
        body = draw(st.binary(max_size=300))
    return Case(method, body, "application/proto")


CONTENT_TYPES = st.one_of(
    st.sampled_from(
        [
            None,
            "",
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "application/connect+json",
            "application/connect+proto",
            "application/grpc-web+proto",
            "application/grpc-web+json",
            "application/grpc-web-text",
            # (application/grpc needs HTTP/2: test_fuzz_grpc, test_grpc_over_http1)
            "application/JSON",
            "application/proto; charset=utf-8",
            "application/json, application/proto",
            "application/\x7f",
            "*/*",
        ]
    ),
    st.text(string.printable, max_size=60),
)


@st.composite
def envelope(draw: st.DrawFn, message: bytes) -> bytes:
    """A Connect-streaming / gRPC-Web frame: flags, a length that may lie, the message."""
    flags = draw(st.sampled_from([0, 1, 2, 0x80, 0xFF]))
    length = draw(st.one_of(st.just(len(message)), st.integers(0, 2**32 - 1)))
    frame = bytes([flags]) + struct.pack(">I", length) + message
    return frame if draw(st.booleans()) else frame[: draw(st.integers(0, len(frame)))]


@st.composite
def protocol_cases(draw: st.DrawFn) -> Case:
    """Wrong or odd content types, envelopes, HTTP methods and Connect GET requests."""
    method, value = draw(request_values())
    message = draw(st.sampled_from([to_json(value), encode(method, value) or b"", b""]))
    kind = draw(st.sampled_from(["content-type", "envelope", "grpc-web-text", "http-method", "get"]))
    if kind == "content-type":
        return Case(method, draw(st.one_of(st.just(message), st.binary(max_size=100))), draw(CONTENT_TYPES))
    if kind == "envelope":
        content_type = draw(
            st.sampled_from(
                [
                    "application/grpc-web+proto",
                    "application/grpc-web+json",
                    "application/connect+proto",
                    "application/connect+json",
                ]
            )
        )
        return Case(method, draw(envelope(message)), content_type)
    if kind == "grpc-web-text":
        text = base64.b64encode(draw(envelope(message)))
        return Case(method, draw(st.one_of(st.just(text), mangled(text))), "application/grpc-web-text")
    if kind == "http-method":
        verb = draw(st.sampled_from(["PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE"]))
        return Case(method, message, "application/json", http_method=verb)
    query = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "encoding": st.sampled_from(["json", "proto", "xml", ""]),
                "message": st.one_of(
                    st.just(message.decode("utf-8", "replace")),
                    TEXT,
                    st.just(base64.urlsafe_b64encode(message).decode()),
                ),
                "base64": st.sampled_from(["1", "0", "true", ""]),
                "compression": st.sampled_from(["gzip", "identity", "br", ""]),
                "connect": st.sampled_from(["v1", "v2", ""]),
            },
        )
    )
    return Case(method, b"", None, http_method="GET", query=tuple(query.items()))


HEADER_NAMES = st.one_of(
    st.sampled_from(
        [
            b"connect-timeout-ms",
            b"connect-protocol-version",
            b"content-encoding",
            b"connect-content-encoding",
            b"connect-accept-encoding",
            b"accept-encoding",
            b"grpc-timeout",
            b"x-request-id",
            b"te",
            b"content-length",
            b"transfer-encoding",
            b"x-forwarded-for",
            b"cookie",
            b"x-custom",
        ]
    ),
    st.binary(min_size=1, max_size=20).filter(lambda b: all(33 <= c < 127 and c != ord(":") for c in b)),
)
HEADER_VALUES = st.one_of(
    st.sampled_from(
        [
            b"",
            b"1",
            b"0",
            b"-5",
            b"99999999999",
            b"1" * 30,
            b"gzip",
            b"br",
            b"identity",
            b"gzip, br",
            b"chunked",
            b"1S",
            b"1n",
            b"H",
            b"v1",
            b"2",
        ]
    ),
    st.binary(max_size=60).map(
        lambda b: b.replace(b"\r", b"").replace(b"\n", b"").replace(b"\x00", b"").strip()
    ),
    st.integers(1000, 200_000).map(lambda n: b"a" * n),
)
AUTHS = st.one_of(
    st.just(b""),
    st.none(),
    st.sampled_from(
        [
            b"Bearer",
            b"Basic Zm9vOmJhcg==",
            b"bearer dev_customer_fz-ops",
            b"Bearer dev_customer_",
            b"Bearer dev_customer_" + b"x" * 10_000,
            b"Bearer dev_customer_\xff\xfe",
            b"Bearer a.b.c",
            b"Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJmei1vcHMifQ.",
        ]
    ),
    st.binary(max_size=80).map(
        lambda b: (b"Bearer " + b.replace(b"\r", b"").replace(b"\n", b"").replace(b"\x00", b"")).strip()
    ),
)


@st.composite
def metadata_cases(draw: st.DrawFn) -> Case:
    """Odd, huge and non-UTF-8 headers (metadata), timeouts, compression, credentials."""
    method, value = draw(request_values())
    body = to_json(value)
    headers = draw(st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=6))
    if draw(st.booleans()):  # lots of them
        headers += [
            (f"x-m-{i}".encode(), b"v" * draw(st.integers(0, 200))) for i in range(draw(st.integers(50, 400)))
        ]
    if any(k == b"content-encoding" and v == b"gzip" for k, v in headers) and draw(st.booleans()):
        body = gzip.compress(body) if draw(st.booleans()) else draw(mangled(gzip.compress(body)))
    headers = [(k, v) for k, v in headers if k not in (b"content-length", b"transfer-encoding")]
    return Case(method, body, "application/json", headers=tuple(headers), auth=draw(AUTHS))


# ---- the daemon under fire ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory, assets_dir: Path) -> Iterator[Target]:
    with own_daemon(
        tmp_path_factory.mktemp("fuzz"), assets_dir, "--no-network-enabled", name="rel-fuz"
    ) as daemon:
        Rpc(daemon.url, OPERATOR).create(vm_id=OWNED)
        Rpc(daemon.url, OTHER).create(vm_id=FOREIGN)
        target = Target(daemon)
        yield target
        print(f"{target.sent} hostile requests")


@pytest.fixture(autouse=True)
def alive(target: Target) -> Iterator[None]:
    """Each test starts with a live daemon, even if the one before killed it."""
    target.revive()
    yield


# ---- inputs that once broke the daemon --------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [deep(100_000, "array"), deep(100_000, "object"), deep(50_000, "metadata")],
    ids=["array", "object", "metadata"],
)
def test_deeply_nested_json_is_refused(target: Target, body: bytes) -> None:
    resp = target.check(Case("CreateVm", body))
    assert resp.status_code == 400 and connect_code(resp) == "invalid_argument", resp.text[:300]


@pytest.mark.parametrize("header", [b"x-custom", b"authorization"])
def test_header_value_not_utf8(target: Target, header: bytes) -> None:
    """Header values are bytes (RFC 9110 allows obs-text): a bad one is refused or ignored, not a 500."""
    case = Case("ListVms", b"{}", headers=((header, b"Bearer dev_customer_\xff\xfe"),), auth=None)
    resp = target.check(case)
    assert resp.status_code in (200, 400, 401), resp.text[:300]


@pytest.mark.parametrize("states", [[99], [-1], [2**31 - 1]])
def test_unknown_state_filter_is_invalid_argument(target: Target, states: list[int]) -> None:
    resp = target.check(Case("ListVms", to_json({"state_filter": states})))
    assert resp.status_code == 400 and connect_code(resp) == "invalid_argument", resp.text[:300]


# ---- fuzz ---------------------------------------------------------------------------------------------


def test_fuzz_connect_json(target: Target) -> None:
    @FUZZ
    @given(case=json_cases())
    def run(case: Case) -> None:
        target.check(case)

    run()
    target.still_serves()


def test_fuzz_connect_proto(target: Target) -> None:
    @FUZZ
    @given(case=proto_cases())
    def run(case: Case) -> None:
        target.check(case)

    run()
    target.still_serves()


def test_fuzz_content_types_envelopes_and_get(target: Target) -> None:
    @FUZZ
    @given(case=protocol_cases())
    def run(case: Case) -> None:
        target.check(case)

    run()
    target.still_serves()


def test_fuzz_metadata(target: Target) -> None:
    @FUZZ
    @given(case=metadata_cases())
    def run(case: Case) -> None:
        target.check(case)

    run()
    target.still_serves()


GRPC_BAD = {2, 13, 14, 15}  # UNKNOWN, INTERNAL, UNAVAILABLE, DATA_LOSS


def h2_call(
    port: int, path: str, headers: list[tuple[bytes, bytes]], body: bytes, timeout: float
) -> tuple[dict[bytes, bytes], bytes, dict[bytes, bytes]]:
    """One raw HTTP/2 request (cleartext, prior knowledge): (response headers, body, trailers). For bodies
    grpcio cannot send: broken envelopes, odd content types. Bodies stay within the first window."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    stream = conn.get_next_available_stream_id()
    pseudo = [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":authority", b"127.0.0.1"),
        (b":path", path.encode()),
    ]
    try:
        conn.send_headers(stream, [*pseudo, *headers])
    except h2.exceptions.ProtocolError:
        reject()  # not even sendable over HTTP/2
    body = body[: conn.local_flow_control_window(stream)]
    size = conn.max_outbound_frame_size
    for at in range(0, len(body), size):
        conn.send_data(stream, body[at : at + size])
    conn.end_stream(stream)
    response: dict[bytes, bytes] = {}
    trailers: dict[bytes, bytes] = {}
    data = b""
    deadline = time.monotonic() + timeout
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(conn.data_to_send())
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed before the stream ended")
            for event in conn.receive_data(chunk):
                if isinstance(event, h2.events.ResponseReceived):
                    response = dict(event.headers)
                elif isinstance(event, h2.events.TrailersReceived):
                    trailers = dict(event.headers)
                elif isinstance(event, h2.events.DataReceived):
                    data += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                    return response, data, trailers
            sock.sendall(conn.data_to_send())
    raise TimeoutError


@st.composite
def grpc_cases(draw: st.DrawFn) -> Case:
    """gRPC requests as raw HTTP/2 sees them: envelopes that may lie, odd gRPC headers."""
    base = draw(st.one_of(proto_cases(), json_cases()))
    message = base.body[:30_000]
    body = draw(st.one_of(envelope(message), mangled(b"\0" + struct.pack(">I", len(message)) + message)))
    content_type = draw(
        st.sampled_from(
            ["application/grpc", "application/grpc+proto", "application/grpc+json", "application/grpc+xml"]
        )
    )
    headers = draw(
        st.lists(
            st.tuples(
                st.sampled_from(
                    [b"grpc-timeout", b"grpc-encoding", b"grpc-accept-encoding", b"te", b"x-custom"]
                ),
                st.one_of(
                    HEADER_VALUES.filter(lambda v: len(v) < 2000),
                    st.sampled_from([b"1S", b"1n", b"trailers"]),
                ),
            ),
            max_size=3,
        )
    )
    return Case(base.method, body, content_type, headers=(*headers, (b"te", b"trailers")))


def test_fuzz_grpc(target: Target) -> None:
    """gRPC over HTTP/2: well-framed random messages through grpcio (up to far over the size limit),
    and broken frames and odd gRPC headers over raw HTTP/2. Every call ends with a deliberate
    grpc-status: never UNKNOWN, INTERNAL (but for a compressed frame without grpc-encoding, which
    gRPC prescribes), UNAVAILABLE or DATA_LOSS; DEADLINE_EXCEEDED only if the caller set a timeout."""
    channel = grpc.insecure_channel(
        f"127.0.0.1:{target.daemon.port}", options=[("grpc.max_send_message_length", 4 << 20)]
    )

    def through_grpcio(case: Case) -> None:
        call = channel.unary_unary(f"/{SERVICE}/{case.method}", _registered_method=False)
        auth = (("authorization", f"Bearer {token(customer_for(case.method))}"),)
        try:
            call(case.body, metadata=auth, timeout=TIMEOUT)
        except grpc.RpcError as exc:
            died = target.revive(2 if exc.code() == grpc.StatusCode.UNAVAILABLE else 0)
            assert not died, died
            assert exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer within {TIMEOUT:g}s (hang)"
            assert exc.code().value[0] not in GRPC_BAD, f"{exc.code()}: {exc.details()}"

    def through_h2(case: Case) -> None:
        try:
            response, data, trailers = h2_call(
                target.daemon.port, f"/{SERVICE}/{case.method}", case.http_headers(), case.body, TIMEOUT
            )
        except (OSError, TimeoutError, h2.exceptions.ProtocolError) as exc:
            died = target.revive(2)
            raise AssertionError(f"no gRPC answer ({exc!r}) {died}") from None
        status = int(trailers.get(b"grpc-status", response.get(b"grpc-status", b"-1")))
        message = trailers.get(b"grpc-message", response.get(b"grpc-message", b""))
        if response.get(b":status") != b"200":
            assert int(response.get(b":status", b"0")) < 500, (response, data[:300])
            return
        assert status >= 0, f"no grpc-status: {response} {trailers}"
        if status == 13 and case.compressed_frame and b"compress" in message:
            return
        assert status not in GRPC_BAD, f"grpc-status {status}: {message!r}"
        assert status != 4 or case.sets_timeout, f"grpc-status 4 without a timeout: {message!r}"

    @FUZZ
    @given(case=st.one_of(proto_cases(), json_cases()), raw=grpc_cases(), use_raw=st.booleans())
    def run(case: Case, raw: Case, use_raw: bool) -> None:
        if not use_raw and len(case.body) > 1 << 20:
            reject()  # oversized over gRPC: test_oversized_grpc_message_is_resource_exhausted
        if use_raw:
            through_h2(raw)
        else:
            through_grpcio(case)
        assert not target.revive()

    try:
        run()
    finally:
        channel.close()
    target.still_serves()


def test_grpc_over_http1_is_refused_deliberately(target: Target) -> None:
    """gRPC needs HTTP/2; over HTTP/1.1 the answer should say so (a 4xx, or UNIMPLEMENTED /
    INVALID_ARGUMENT / FAILED_PRECONDITION), not UNKNOWN with an error logged as a server fault."""
    resp = target.send(Case("ListVms", b"\0\0\0\0\0", "application/grpc"))
    status = grpc_web_status(resp)
    assert 400 <= resp.status_code < 500 or status in (3, 9, 12), (resp.status_code, dict(resp.headers))


def test_oversized_grpc_message_is_resource_exhausted(target: Target) -> None:
    """Over gRPC, a message over the 1 MiB limit is RESOURCE_EXHAUSTED, every time: not INTERNAL
    "Stream removed" when the server answers before the client has sent it all."""
    size = 8 << 20
    body = b"\x1a" + varint(size) + b"\0" * size  # an unknown length-delimited field of 8 MiB
    with grpc.insecure_channel(
        f"127.0.0.1:{target.daemon.port}", options=[("grpc.max_send_message_length", 64 << 20)]
    ) as channel:
        call = channel.unary_unary(f"/{SERVICE}/GetVmInfo", _registered_method=False)
        codes: Counter[str] = Counter()
        for _ in range(20):
            try:
                call(body, metadata=(("authorization", f"Bearer {token(OPERATOR)}"),), timeout=TIMEOUT)
                codes["OK"] += 1
            except grpc.RpcError as exc:
                codes[f"{exc.code().name}: {exc.details()[:70]}"] += 1
    assert list(codes) == ["RESOURCE_EXHAUSTED: message is larger than configured max 1048576"], dict(codes)
