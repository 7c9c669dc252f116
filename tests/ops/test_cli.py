"""`metalctl`, the installed entry point, run as a user would against the running daemon: every
command, `-o json`, files in the reference's format, exit codes, and what a TTY shows."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import time
from pathlib import Path

import pytest

from tests.ops.support import METALCTL, metalctl
from tests.support.daemon import REPO, Daemon, free_port
from tests.support.rpc import Rpc, token


def test_create_list_get_delete(daemon: Daemon, rpc: Rpc, customer: str) -> None:
    run = lambda *a: metalctl(*a, url=daemon.url, token=token(customer))  # noqa: E731
    made = run("create", "cli-a", "--vcpus", "2", "--memory", "512MiB", "-m", "name=alpha", "-m", "team=ops")
    assert made.returncode == 0, made.stderr
    assert made.stdout.split()[:2] == ["cli-a", "CREATED"]
    info = rpc.info("cli-a")
    assert info["config"]["cpu"]["vcpu_count"] == 2
    assert info["config"]["memory"]["size_bytes"] == 512 << 20
    assert info["config"]["metadata"] == {"name": "alpha", "team": "ops"}

    listed = run("list")
    assert listed.returncode == 0
    header, row = listed.stdout.splitlines()
    assert header.split() == ["VM", "ID", "STATE", "VCPUS", "MEMORY", "CREATED", "NAME"]
    assert row.split()[:5] == ["cli-a", "CREATED", "2", "512", "MiB"] and row.endswith("alpha")
    assert "\x1b[" not in listed.stdout  # no colours into a pipe

    as_json = json.loads(run("list", "-o", "json").stdout)
    assert as_json["total_count"] == 1 and as_json["vms"][0]["vm_id"] == "cli-a"
    got = json.loads(run("get", "cli-a", "-o", "json").stdout)
    assert got == rpc.info("cli-a")  # the API's own JSON
    details = run("get", "cli-a").stdout
    assert "512 MiB" in details and "/assets/rootfs.ext4 (root)" in details

    assert json.loads(run("-o", "json", "delete", "cli-a").stdout) == {"vm_id": "cli-a", "success": True}
    assert (
        run("list", "--state", "created", "-o", "json").stdout.strip()
        == '{\n  "vms": [],\n  "total_count": 0\n}'
    )


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_create_from_a_reference_file(
    daemon: Daemon, rpc: Rpc, customer: str, tmp_path: Path, suffix: str
) -> None:
    request = {
        "vm_id": "from-file",
        "config": {
            "cpu": {"vcpu_count": 2},
            "memory": {"size_bytes": 268435456},
            "boot": {
                "kernel_path": "/assets/vmlinux",
                "kernel_args": "console=ttyS0 quiet",
                "initrd_path": "/assets/initrd",
            },
            "storage": [
                {"device_id": "rootfs", "path_on_host": "/assets/rootfs.ext4", "is_root_device": True}
            ],
            "console": {"type": "SERIAL"},
            "metadata": {"name": "my-vm", "project": "test"},
        },
    }
    path = tmp_path / f"vm{suffix}"
    if suffix == ".yaml":
        import yaml

        path.write_text(yaml.safe_dump(request))
    else:
        path.write_text(json.dumps(request))
    done = metalctl(
        "create", "-f", str(path), "--vcpus", "1", "-o", "json", url=daemon.url, token=token(customer)
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"vm_id": "from-file", "success": True, "state": "VM_STATE_CREATED"}
    config = rpc.info("from-file")["config"]
    assert config["cpu"]["vcpu_count"] == 1  # the flag wins over the file
    assert config["boot"]["kernel_args"] == "console=ttyS0 quiet"
    assert config["metadata"] == {"name": "my-vm", "project": "test"}


def test_failures_exit_with_the_code(daemon: Daemon, rpc: Rpc, customer: str, tmp_path: Path) -> None:
    vm_id = rpc.create()
    run = lambda *a, **kw: metalctl(*a, url=kw.get("url", daemon.url), token=kw.get("tok", token(customer)))  # noqa: E731
    missing = run("get", "no-such-vm")
    assert missing.returncode == 5 and missing.stdout == ""
    assert "not_found: VM no-such-vm not found [VM_NOT_FOUND]" in missing.stderr
    refused = run("pause", vm_id, "-o", "json")
    assert refused.returncode == 9
    error = json.loads(refused.stderr)["error"]
    assert error["code"] == "failed_precondition" and error["error_info"]["reason"] == "INVALID_STATE"
    assert error["error_info"]["metadata"]["current_state"] == "VM_STATE_CREATED"
    assert run("delete", vm_id, tok=token("x" + customer)).returncode == 7
    assert run("list", tok="garbage").returncode == 16
    assert run("create", "--vcpus", "64").returncode == 3
    assert run("list", url=f"http://127.0.0.1:{free_port()}").returncode == 14
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    assert run("create", "-f", str(bad)).returncode == 3
    assert run("list", "--state", "sleeping").returncode == 3
    waited = run("wait", vm_id, "--state", "running", "--timeout", "0.5")
    assert waited.returncode == 4 and "deadline_exceeded" in waited.stderr
    assert run("create", "--memory", "lots").returncode == 2  # usage


def test_health_command(daemon: Daemon) -> None:
    done = metalctl("health", url=daemon.url)
    assert done.returncode == 0
    assert done.stdout.startswith("metald healthy") and "backend_ping" in done.stdout
    assert json.loads(metalctl("health", "-o", "json", url=daemon.url).stdout)["status"] == "healthy"


def run_on_a_tty(argv: list[str], env: dict[str, str], timeout: float = 60) -> tuple[int, str]:
    """Run with stdout and stderr on a pseudo-terminal; returns (status, what the screen got)."""
    primary, secondary = pty.openpty()
    proc = subprocess.Popen(argv, stdin=secondary, stdout=secondary, stderr=secondary, env=env, cwd=REPO)
    os.close(secondary)
    chunks = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            data = os.read(primary, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(primary)
    return proc.wait(10), b"".join(chunks).decode(errors="replace")


def test_tty_gets_colours_and_a_spinner(daemon: Daemon, rpc: Rpc, customer: str) -> None:
    vm_id = rpc.create(vm_id="tty-vm")
    env = {**os.environ, "METALD_URL": daemon.url, "METALD_TOKEN": token(customer), "TERM": "xterm-256color"}
    env.pop("NO_COLOR", None)
    status, screen = run_on_a_tty([*METALCTL, "list"], env)
    assert status == 0 and vm_id in screen
    assert "\x1b[36mCREATED" in screen  # CREATED in cyan
    status, screen = run_on_a_tty([*METALCTL, "wait", vm_id, "--state", "running", "--timeout", "1.5"], env)
    assert status == 4
    assert f"waiting for {vm_id} to be RUNNING" in screen and "0:00:01" in screen  # elapsed time


@pytest.mark.e2e
def test_boot_console_follow_and_the_rest(daemon: Daemon, rpc: Rpc, customer: str) -> None:
    run = lambda *a: metalctl(*a, url=daemon.url, token=token(customer))  # noqa: E731
    assert run("create", "cli-boot", "--vcpus", "1", "--memory", "256MiB").returncode == 0
    follower = subprocess.Popen(  # follows the console from before the VM ever ran
        [*METALCTL, "console", "cli-boot", "-f"],
        stdout=subprocess.PIPE,
        env={**os.environ, "METALD_URL": daemon.url, "METALD_TOKEN": token(customer)},
        cwd=REPO,
    )
    try:
        booted = run("boot", "cli-boot")
        assert booted.returncode == 0, booted.stderr
        assert booted.stdout.startswith("cli-boot  RUNNING  booted, guest up, in ")
        deadline = time.monotonic() + 30
        seen = b""
        while b"METALD_READY vm_id=cli-boot" not in seen and time.monotonic() < deadline:
            assert follower.stdout is not None
            seen += follower.stdout.readline()
        assert b"METALD_READY vm_id=cli-boot" in seen
    finally:
        follower.terminate()
        follower.wait(10)
    assert run("pause", "cli-boot").stdout.startswith("cli-boot  PAUSED  paused in")
    assert run("resume", "cli-boot").stdout.startswith("cli-boot  RUNNING  resumed in")
    down = run("shutdown", "cli-boot", "-o", "json")  # graceful: the guest is up
    assert json.loads(down.stdout) == {"vm_id": "cli-boot", "success": True, "state": "VM_STATE_SHUTDOWN"}
    waited = run("wait", "cli-boot", "--state", "shutdown", "-o", "json")
    assert json.loads(waited.stdout) == {"vm_id": "cli-boot", "state": "VM_STATE_SHUTDOWN"}

    # the console of a stopped VM no longer grows: the whole and its tail must agree
    console = run("console", "cli-boot")
    assert console.returncode == 0 and "METALD_READY vm_id=cli-boot" in console.stdout
    assert "METALD_POWEROFF" in console.stdout
    tail = run("console", "cli-boot", "--tail", "200").stdout  # the last 200 bytes (\r\n read as \n)
    assert console.stdout.endswith(tail) and 150 < len(tail) <= 200
    assert run("delete", "cli-boot").returncode == 0
    assert run("get", "cli-boot").returncode == 5

    quick = run("create", "cli-quick", "--boot", "--no-wait", "-o", "json")
    assert json.loads(quick.stdout) == {"vm_id": "cli-quick", "success": True, "state": "VM_STATE_RUNNING"}
    assert run("reboot", "cli-quick", "--force").stdout.startswith("cli-quick  RUNNING  rebooted in")
    assert run("delete", "cli-quick").returncode == 9  # running: needs --force
    assert run("delete", "cli-quick", "--force").returncode == 0
