"""The OpenAPI 3.1 document of the REST surface, generated: paths from metald.api.rest.ROUTES,
bodies and responses from the proto descriptors (in the JSON the daemon speaks: proto field
names, 64-bit integers as numbers or, beyond 2^53, decimal strings; enums by name).

`python -m metald.api.openapi` rewrites metald/api/openapi.json, the committed copy; a test
checks that the copy equals what this module generates.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from protobuf import (
    DescEnum,
    DescField,
    DescFieldValueEnum,
    DescFieldValueList,
    DescFieldValueMap,
    DescFieldValueMessage,
    DescFieldValueScalar,
    DescMessage,
    ScalarType,
)

from metald import __version__
from metald.api.health import HEALTH_SCHEMA
from metald.api.rest import CONSOLE_MAX_CHUNK, ROUTES, SERVICE, RestRoute, input_of
from metald.domain.ids import VM_ID_PATTERN

PATH = Path(__file__).with_name("openapi.json")
ERROR_STATUSES = {
    "400": "invalid_argument (or a request the decoder refuses)",
    "401": "unauthenticated",
    "403": "permission_denied: the VM (or snapshot) belongs to another customer",
    "404": "not_found",
    "409": "already_exists",
    "412": "failed_precondition: the VM's state (or the host) does not allow the operation",
    "429": "resource_exhausted: quota, capacity or request size",
    "500": "internal",
    "503": "unavailable",
    "504": "deadline_exceeded",
}
_CODES = [
    "canceled",
    "unknown",
    "invalid_argument",
    "deadline_exceeded",
    "not_found",
    "already_exists",
    "permission_denied",
    "resource_exhausted",
    "failed_precondition",
    "aborted",
    "out_of_range",
    "unimplemented",
    "internal",
    "unavailable",
    "data_loss",
    "unauthenticated",
]
_INT32 = {"type": "integer", "format": "int32", "minimum": -(2**31), "maximum": 2**31 - 1}
_UINT32 = {"type": "integer", "format": "uint32", "minimum": 0, "maximum": 2**32 - 1}
_INT64 = {
    "type": ["integer", "string"],
    "format": "int64",
    "pattern": "^-?[0-9]+$",
    "minimum": -(2**63),
    "maximum": 2**63 - 1,
}
_UINT64 = {**_INT64, "format": "uint64", "pattern": "^[0-9]+$", "minimum": 0, "maximum": 2**64 - 1}
_SCALARS: dict[ScalarType, dict[str, Any]] = {
    ScalarType.DOUBLE: {"type": "number"},
    ScalarType.FLOAT: {"type": "number"},
    ScalarType.INT64: _INT64,
    ScalarType.SINT64: _INT64,
    ScalarType.SFIXED64: _INT64,
    ScalarType.UINT64: _UINT64,
    ScalarType.FIXED64: _UINT64,
    ScalarType.INT32: _INT32,
    ScalarType.SINT32: _INT32,
    ScalarType.SFIXED32: _INT32,
    ScalarType.UINT32: _UINT32,
    ScalarType.FIXED32: _UINT32,
    ScalarType.BOOL: {"type": "boolean"},
    ScalarType.STRING: {"type": "string"},
    ScalarType.BYTES: {"type": "string", "contentEncoding": "base64"},
}
_WELL_KNOWN: dict[str, dict[str, Any]] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
}


class _Schemas:
    """Collects one component schema per message reached."""

    def __init__(self) -> None:
        self.components: dict[str, Any] = {}

    def ref(self, desc: DescMessage) -> dict[str, Any]:
        if desc.type_name in _WELL_KNOWN:
            return dict(_WELL_KNOWN[desc.type_name])
        if desc.type_name not in self.components:
            self.components[desc.type_name] = {}  # placeholder: breaks recursion
            self.components[desc.type_name] = self.message(desc)
        return {"$ref": f"#/components/schemas/{desc.type_name}"}

    def message(self, desc: DescMessage, without: frozenset[str] = frozenset()) -> dict[str, Any]:
        properties = {f.name: self.field(f) for f in desc.fields if f.name not in without}
        return {"type": "object", "properties": properties, "additionalProperties": False}

    def element(self, element: DescMessage | DescEnum | ScalarType) -> dict[str, Any]:
        if isinstance(element, DescMessage):
            return self.ref(element)
        if isinstance(element, DescEnum):
            return {"type": "string", "enum": [v.name for v in element.values]}
        return dict(_SCALARS[element])

    def field(self, field: DescField) -> dict[str, Any]:
        value = field.value
        if isinstance(value, DescFieldValueList):
            return {"type": "array", "items": self.element(value.element)}
        if isinstance(value, DescFieldValueMap):
            return {"type": "object", "additionalProperties": self.element(value.value)}
        if isinstance(value, DescFieldValueMessage):
            return self.ref(value.message)
        if isinstance(value, DescFieldValueEnum):
            return self.element(value.enum)
        assert isinstance(value, DescFieldValueScalar)
        return self.element(value.scalar)


def _id_parameter(name: str = "vm_id") -> dict[str, Any]:
    """A path parameter: a vm_id or a snapshot_id (snapshot ids follow the vm ids' rules)."""
    return {
        "name": name,
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": f"^{VM_ID_PATTERN.pattern}$"},
    }


def _error_responses() -> dict[str, Any]:
    return {status: {"$ref": f"#/components/responses/Error{status}"} for status in ERROR_STATUSES}


def _rpc_operation(route: RestRoute, schemas: _Schemas) -> dict[str, Any]:
    assert route.rpc is not None
    method = next(m for m in SERVICE.methods if m.name == route.rpc)
    path_params = frozenset(route.path_params)
    operation: dict[str, Any] = {
        "operationId": route.rpc,
        "summary": route.summary,
        "description": f"Calls `{SERVICE.type_name}/{route.rpc}`; same auth, errors and codes.",
        "tags": [route.tag],
        "parameters": [_id_parameter(name) for name in route.path_params],
        "responses": {
            "200": {
                "description": "OK",
                "content": {"application/json": {"schema": schemas.ref(method.output)}},
            },
            **_error_responses(),
        },
    }
    desc = input_of(route.rpc)
    if route.body:
        schema = schemas.message(desc, path_params) if path_params else schemas.ref(desc)
        operation["requestBody"] = {"required": False, "content": {"application/json": {"schema": schema}}}
    else:
        for field in desc.fields:
            if field.name in path_params:
                continue
            param: dict[str, Any] = {"name": field.name, "in": "query", "schema": schemas.field(field)}
            if isinstance(field.value, DescFieldValueList):
                param.update(style="form", explode=True)
            operation["parameters"].append(param)
    return operation


def _console_operation(route: RestRoute) -> dict[str, Any]:
    integer = {"type": "integer", "minimum": 0}
    return {
        "operationId": "ReadConsole",
        "summary": route.summary,
        "description": "Bytes of the console log from `offset`; poll with the returned "
        "X-Console-Offset to follow. Only the VM's owner may read it.",
        "tags": ["VMs"],
        "parameters": [
            _id_parameter(),
            {"name": "offset", "in": "query", "schema": {**integer, "maximum": 2**62}},
            {
                "name": "limit",
                "in": "query",
                "schema": {**integer, "minimum": 1, "maximum": CONSOLE_MAX_CHUNK},
            },
        ],
        "responses": {
            "200": {
                "description": "console bytes (possibly none)",
                "headers": {
                    "X-Console-Offset": {"description": "offset to read next", "schema": integer},
                    "X-Console-Size": {"description": "current size of the log", "schema": integer},
                },
                "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            },
            **_error_responses(),
        },
    }


def _health_operation() -> dict[str, Any]:
    content = {"application/json": {"schema": HEALTH_SCHEMA}}
    return {
        "operationId": "Health",
        "summary": "Service health (no authentication)",
        "tags": ["Operations"],
        "security": [],
        "responses": {
            "200": {"description": "healthy or degraded", "content": content},
            "503": {"description": "unhealthy", "content": content},
        },
    }


def build_openapi() -> dict[str, Any]:
    schemas = _Schemas()
    paths: dict[str, dict[str, Any]] = {"/health": {"get": _health_operation()}}
    for route in ROUTES:
        operation = _rpc_operation(route, schemas) if route.rpc else _console_operation(route)
        paths.setdefault(route.template, {})[route.method.lower()] = operation
    error = {
        "type": "object",
        "required": ["code"],
        "properties": {
            "code": {"type": "string", "enum": _CODES},
            "message": {"type": "string"},
            "details": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["type", "value"],
                    "properties": {
                        "type": {"type": "string", "examples": ["google.rpc.ErrorInfo"]},
                        "value": {"type": "string", "description": "the detail message, base64"},
                        "debug": {"type": "object", "description": "the detail as JSON"},
                    },
                },
            },
        },
    }
    responses = {
        f"Error{status}": {
            "description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
        for status, description in ERROR_STATUSES.items()
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "metald REST API",
            "version": __version__,
            "description": f"A REST mapping of {SERVICE.type_name} (Connect, gRPC and gRPC-Web are "
            "served on the same port). Errors have the Connect error body.",
        },
        "security": [{"bearer": []}],
        "tags": [{"name": "VMs"}, {"name": "Snapshots"}, {"name": "Operations"}],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "`dev_customer_<id>` in development mode",
                }
            },
            "schemas": {**dict(sorted(schemas.components.items())), "Error": error},
            "responses": responses,
        },
    }


def render() -> str:
    return json.dumps(build_openapi(), indent=2) + "\n"


if __name__ == "__main__":
    PATH.write_text(render())
    sys.stdout.write(f"wrote {PATH}\n")
