"""The outside-client tests again, on the other serving stack an operator can choose: pyvoy's
Envoy (`server = pyvoy`, docs/operations.md). The default (hypercorn) runs them in test_clients.py
and test_wire.py; here the same test functions run against a pyvoy-served daemon, and so does the
whole lifecycle of a real guest (VMM supervision and QMP inside Envoy's Python), with a command run
in it (the agent channel). pyvoy is a `dev` dependency, so the suite always runs them."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.api.test_clients import (
    test_buf_curl,
    test_connect_node,
    test_connectrpc_python_client_binary_proto,
    test_grpcio_lifecycle_and_error_details,
)
from tests.api.test_guest_lifecycle import test_full_lifecycle_on_a_real_guest
from tests.api.test_wire import (
    test_early_refusal_keeps_http1_clients_whole,
    test_grpc_message_is_readable_ascii,
    test_grpc_web_text,
    test_refusals_over_keepalive_connect_node,
    test_refusals_over_keepalive_curl,
    test_unknown_rpc_is_unimplemented_over_grpcio,
)
from tests.conftest import serving
from tests.support.daemon import Daemon
from tests.support.rpc import Rpc

__all__ = [  # collected here again, against this module's `daemon`
    "test_buf_curl",
    "test_connect_node",
    "test_connectrpc_python_client_binary_proto",
    "test_early_refusal_keeps_http1_clients_whole",
    "test_full_lifecycle_on_a_real_guest",
    "test_grpc_message_is_readable_ascii",
    "test_grpc_web_text",
    "test_grpcio_lifecycle_and_error_details",
    "test_refusals_over_keepalive_connect_node",
    "test_refusals_over_keepalive_curl",
    "test_unknown_rpc_is_unimplemented_over_grpcio",
]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, assets_dir: Path) -> Iterator[Daemon]:
    if importlib.util.find_spec("pyvoy") is None:
        pytest.skip("server = pyvoy needs pyvoy: pip install -e '.[pyvoy]'")
    with serving(Daemon(tmp_path_factory.mktemp("pyvoy"), assets_dir, "--server", "pyvoy")) as served:
        yield served


def test_the_daemon_is_served_by_envoy(daemon: Daemon) -> None:
    assert "(cleartext, pyvoy)" in daemon.logs(), daemon.logs()[-2000:]


def test_a_command_runs_in_a_guest_under_envoy(daemon: Daemon, rpc: Rpc) -> None:
    vm_id = rpc.create()
    rpc.ok("BootVm", {"vm_id": vm_id, "wait_for_ready": True})
    assert rpc.exec(vm_id, "/bin/echo", "inside", "envoy") == "inside envoy\n"
    rpc.ok("DeleteVm", {"vm_id": vm_id, "force": True})
    assert rpc.error("GetVmInfo", {"vm_id": vm_id})[0] == 404
