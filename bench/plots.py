"""PNG plots of the benchmark results, written beside their JSON in bench/results/.

- api_floor_<rpc>.png: per protocol, req/s (in flight), server CPU per request and p50/p99 (one
  client) against VMs stored, the daemon beside its framework floor(s); api_load.png likewise for
  the older throughput benchmark;
- boot_times.png: the distribution of time to ready per boot path (every side of
  boot_overhead.json, and of any other boot_*.json of the same form, e.g. clone or warm pool);
- parallel_boots.png: N VMs booted at once, time until the last is ready, per side;
- watch_fanout.png: WatchVms deliveries/s, daemon CPU per delivery and lag against watchers
  (watch_fanout.json; the lag of the fixed-rate run watch_fanout_rate30.json if present; the runs
  before the shared tail, *_before.json, and the pause/resume run beside them).
- snapshot_boot.png: start to ready per start path (cold, clone, clone from a warm pool, and the
  same restores by hand), and N clones at once against N restores by hand;
- fleet_gateway.png: p50 and p99 of each RPC straight to a host and through each gateway, and the
  gateway/direct ratio of p50s against the 1.5x target.

Each plot's footer names the machine, the commit and the load during its run.

    .venv/bin/python -m bench.plots            # every results file present
"""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from bench.common import RESULTS_DIR

PROTOCOL_ORDER = ("connect-json", "connect-proto", "grpc")
SIDE_STYLE = {
    "daemon": ("tab:red", "o", "-"),
    "floor": ("tab:blue", "s", "--"),
    "bare": ("tab:cyan", "^", ":"),
    "daemon-pyvoy": ("tab:purple", "P", "-"),
    "floor-pyvoy": ("tab:green", "D", "--"),
    "bare-pyvoy": ("tab:olive", "v", ":"),
}


def footer(payload: dict[str, Any]) -> str:
    m = payload.get("machine", {})
    start = m.get("loadavg_at_start") or [float("nan")]
    end = m.get("loadavg_at_end") or [float("nan")]
    return (
        f"{m.get('cpu', '?')} ({m.get('cores', '?')} cores), kernel {m.get('kernel', '?')}, "
        f"Python {m.get('python', '?')}; commit {m.get('git_commit', '?')}; {m.get('time', '?')}; "
        f"load average {start[0]:.1f} -> {end[0]:.1f}\n{payload.get('command', '')}"
    )


def _save(fig: Figure, payload: dict[str, Any], path: Path) -> Path:
    width_chars = int(fig.get_figwidth() * 17)  # what fits at 7 pt
    text = "\n".join(textwrap.fill(line, width_chars) for line in footer(payload).splitlines())
    fig.text(0.01, 0.005, text, fontsize=7, va="bottom", ha="left", color="dimgray")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"plot: {path}")
    return path


def _sides(rows: Sequence[dict[str, Any]]) -> list[str]:
    found = {key.rsplit("_req_per_s", 1)[0] for row in rows for key in row if key.endswith("_req_per_s")}
    return [s for s in SIDE_STYLE if s in found]


def _line(ax: Axes, rows: Sequence[dict[str, Any]], side: str, field: str, label: str, **kw: Any) -> None:
    points = sorted((r["stored"], r[f"{side}_{field}"]) for r in rows if f"{side}_{field}" in r)
    if not points:
        return
    color, marker, style = SIDE_STYLE[side]
    ax.plot(
        [p[0] for p in points],
        [p[1] for p in points],
        color=color,
        marker=marker,
        linestyle=kw.pop("linestyle", style),
        label=label,
        **kw,
    )


def plot_api(payload: dict[str, Any], rows: Sequence[dict[str, Any]], rpc: str, path: Path) -> Path:
    """Rows: {stored, rpc, protocol, shape, <side>_req_per_s, <side>_cpu_ms_per_req, <side>_p50_ms, ...}."""
    mine = [r for r in rows if r["rpc"] == rpc]
    protocols = [p for p in PROTOCOL_ORDER if any(r["protocol"] == p for r in mine)]
    fig, axes = plt.subplots(3, len(protocols), figsize=(4.2 * len(protocols), 9.5), squeeze=False)
    sides = _sides(mine)
    for col, proto in enumerate(protocols):
        load = [r for r in mine if r["protocol"] == proto and r["shape"] == "load"]
        single = [r for r in mine if r["protocol"] == proto and r["shape"] == "1 client"]
        ax_rps, ax_cpu, ax_lat = axes[0][col], axes[1][col], axes[2][col]
        for side in sides:
            _line(ax_rps, load, side, "req_per_s", side)
            _line(ax_cpu, load, side, "cpu_ms_per_req", side)
            _line(ax_lat, single, side, "p50_ms", f"{side} p50")
            _line(ax_lat, single, side, "p99_ms", f"{side} p99", linestyle=":", alpha=0.6)
        ax_rps.set_title(f"{rpc} over {proto}")
        ax_rps.set_ylabel("req/s (requests in flight)")
        ax_cpu.set_ylabel("server CPU ms per request")
        ax_lat.set_ylabel("latency ms, one client")
        if rpc == "GetVmInfo":
            ax_cpu.axhline(0.33, color="black", linewidth=0.8, linestyle="-.", label="target 0.33 ms")
            ax_rps.axhline(3000, color="black", linewidth=0.8, linestyle="-.", label="target 3,000/s")
        else:
            ax_lat.axhline(3.0, color="black", linewidth=0.8, linestyle="-.", label="target p50 3 ms")
        for ax in (ax_rps, ax_cpu, ax_lat):
            ax.set_xscale("log")
            ax.set_xlabel("VMs stored")
            ax.set_ylim(bottom=0)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(f"{rpc}: the daemon beside its framework floor (same server, constant answer)")
    return _save(fig, payload, path)


def api_load_rows(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """bench.api_load's rows in the form plot_api takes (one side: the daemon)."""
    out = []
    for r in payload["results"]["load"]:
        row = {k: r[k] for k in ("stored", "rpc", "protocol", "shape")}
        row |= {f"daemon_{k}": r[k] for k in ("req_per_s", "cpu_ms_per_req", "p50_ms", "p99_ms")}
        out.append(row)
    return out


def boot_series(results_dir: Path) -> list[tuple[str, list[float], dict[str, Any]]]:
    """(label, seconds to ready, payload) of every boot path found: the sides of boot_overhead.json
    (cold boots today) and of any other boot_*.json shaped like it (clone, warm pool, ...)."""
    out = []
    files = sorted(results_dir.glob("boot_*.json"), key=lambda p: (p.name != "boot_overhead.json", p.name))
    for path in files:
        payload = json.loads(path.read_text())
        sides = payload.get("results", {}).get("sides", {})
        prefix = "" if path.name == "boot_overhead.json" else f"{path.stem.removeprefix('boot_')}: "
        for side, data in sides.items():
            if data.get("ready_s"):
                out.append((f"{prefix}{side}", list(data["ready_s"]), payload))
    return out


def plot_boots(series: Sequence[tuple[str, list[float], dict[str, Any]]], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(series)), 5))
    data = [s[1] for s in series]
    ax.boxplot(data, showfliers=False)
    ax.set_xticks(range(1, len(series) + 1), [s[0] for s in series], rotation=15)
    for i, values in enumerate(data, start=1):
        ax.scatter([i] * len(values), values, s=14, alpha=0.6, color="tab:red", zorder=3)
        ax.annotate(
            f"median {sorted(values)[len(values) // 2]:.2f} s", (i, max(values)), fontsize=7, ha="center"
        )
    ax.set_ylabel("seconds from the call (or spawn) to the guest's ready line")
    ax.set_ylim(bottom=0)
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_title("Boot time to ready, per boot path (one VM at a time)")
    return _save(fig, series[0][2], path)


def plot_parallel(payload: dict[str, Any], path: Path) -> Path:
    rows = sorted(payload["results"], key=lambda r: r["n"])
    sides = [k for k in rows[0] if isinstance(rows[0][k], dict) and "wall_s" in rows[0][k]]
    fig, (ax, ax_ratio) = plt.subplots(1, 2, figsize=(11, 4.8))
    for side in sides:
        ns = [r["n"] for r in rows if side in r]
        ax.plot(ns, [r[side]["wall_s"] for r in rows if side in r], marker="o", label=side)
        ax_ratio.plot(ns, [r[side]["ratio_wall_to_hand"] for r in rows if side in r], marker="o", label=side)
    ax.set_xlabel("VMs booted at once (N)")
    ax.set_ylabel("seconds until the last is ready")
    ax.set_title("N at once: time to the last ready line")
    ax_ratio.set_xlabel("VMs booted at once (N)")
    ax_ratio.set_ylabel("ratio to QEMU by hand")
    ax_ratio.axhline(1.05, color="black", linewidth=0.8, linestyle="-.", label="1.05")
    ax_ratio.set_title("N at once: ratio to QEMU started by hand")
    for a in (ax, ax_ratio):
        a.set_ylim(bottom=0)
        a.grid(True, alpha=0.3)
        a.legend(fontsize=8)
    return _save(fig, payload, path)


def _fanout_rows(payload: dict[str, Any]) -> list[dict[str, Any]]:
    return sorted((r for r in payload["results"]["levels"] if r["watchers"]), key=lambda r: r["watchers"])


def plot_watch_fanout(
    closed: Sequence[tuple[str, dict[str, Any]]], paced: Sequence[tuple[str, dict[str, Any]]], path: Path
) -> Path:
    """(label, watch_fanout payload) runs: as fast as the producer goes (deliveries/s, daemon CPU
    per delivery), and at a fixed rate (lag p50/p99; closed-loop lags if no paced run)."""
    fig, (ax_rate, ax_cpu, ax_lag) = plt.subplots(1, 3, figsize=(15, 4.8))
    colors = ("tab:blue", "tab:orange", "tab:green", "tab:red")
    for (label, payload), color in zip(closed, colors, strict=False):
        rows = _fanout_rows(payload)
        ns = [r["watchers"] for r in rows]
        ax_rate.plot(ns, [r["deliveries_per_s"] for r in rows], marker="o", color=color, label=label)
        ax_cpu.plot(ns, [r["daemon_cpu_us_per_delivery"] for r in rows], marker="o", color=color, label=label)
    rate = ""
    for (label, payload), color in zip(paced or closed, colors, strict=False):
        rows = _fanout_rows(payload)
        ns = [r["watchers"] for r in rows]
        rate = f" at {payload['params'].get('rate') or 'max'} events/s written"
        ax_lag.plot(ns, [r["lag_ms_p50"] for r in rows], marker="o", color=color, label=f"{label} p50")
        ax_lag.plot(ns, [r["lag_ms_p99"] for r in rows], marker="^", linestyle="--", color=color,
                    label=f"{label} p99")  # fmt: skip
    ax_rate.set_ylabel("events delivered per second (all watchers)")
    ax_rate.set_title("WatchVms deliveries/s, producer as fast as it goes")
    ax_cpu.set_ylabel("daemon CPU us per delivery (writing the events included)")
    ax_cpu.set_yscale("log")
    ax_cpu.set_title("Daemon CPU per delivery")
    ax_lag.set_ylabel("ms from the event's `at` to its receipt")
    ax_lag.set_title(f"Lag per delivery{rate}")
    for a in (ax_rate, ax_cpu, ax_lag):
        a.set_xscale("log")
        a.set_xlabel("concurrent watchers (one customer)")
        a.grid(True, alpha=0.3)
        a.legend(fontsize=7)
    ax_rate.set_ylim(bottom=0)
    ax_lag.set_ylim(bottom=0)
    return _save(fig, closed[0][1], path)


def plot_snapshots(payload: dict[str, Any], path: Path) -> Path:
    results = payload["results"]
    runs: dict[str, list[float]] = results["runs_s"]
    fig, (ax, ax_n) = plt.subplots(1, 2, figsize=(12, 5))
    sides = list(runs)
    ax.boxplot([[1000 * v for v in runs[s]] for s in sides], showfliers=False)
    ax.set_xticks(range(1, len(sides) + 1), sides)
    for i, side in enumerate(sides, start=1):
        values = [1000 * v for v in runs[side]]
        ax.scatter([i] * len(values), values, s=14, alpha=0.6, color="tab:red", zorder=3)
        ax.annotate(f"{1000 * results['median_s'][side]:.0f} ms", (i, max(values)), fontsize=8, ha="center")
    ax.set_yscale("log")
    ax.set_ylabel("ms from the call (or spawn) to ready (log scale)")
    ax.set_title("One VM: cold boot, clone, clone from a warm pool, by hand")
    ax.grid(True, axis="y", alpha=0.3)
    scaling = results["scaling"]
    ns = sorted(int(n) for n in scaling)
    for key, label in (("clone_all_ready_s", "clones (API)"), ("hand_all_ready_s", "restores by hand")):
        ax_n.plot(ns, [scaling[str(n)][key] for n in ns], marker="o", label=label)
    ax_n.set_xlabel("started at once (N)")
    ax_n.set_ylabel("seconds until the last is ready")
    ax_n.set_title("N clones of one snapshot at once")
    ax_n.set_ylim(bottom=0)
    ax_n.grid(True, alpha=0.3)
    ax_n.legend(fontsize=8)
    return _save(fig, payload, path)


GATEWAY_SIDE_COLOR = {"direct": "tab:blue", "gateway": "tab:orange", "gateway-pyvoy": "tab:green"}


def plot_fleet_gateway(payload: dict[str, Any], path: Path) -> Path:
    latency: dict[str, dict[str, Any]] = payload["results"]["latency"]
    rpcs = list(latency)
    sides = [s for s in ("direct", "gateway", "gateway-pyvoy") if s in latency[rpcs[0]]]
    labels = [textwrap.fill(rpc, 14) for rpc in rpcs]
    fig, (ax, ax_ratio) = plt.subplots(1, 2, figsize=(13, 5))
    width = 0.8 / len(sides)
    for i, side in enumerate(sides):
        xs = [r + (i - (len(sides) - 1) / 2) * width for r in range(len(rpcs))]
        p50 = [latency[rpc][side]["p50_ms"] for rpc in rpcs]
        p99 = [latency[rpc][side]["p99_ms"] for rpc in rpcs]
        ax.bar(xs, p50, width, label=f"{side} p50", color=GATEWAY_SIDE_COLOR[side])
        ax.scatter(xs, p99, marker="_", s=200, color="black", zorder=3, label="p99" if i == 0 else None)
    ax.set_xticks(range(len(rpcs)), labels, fontsize=8)
    ax.set_ylabel("ms per call, one client, interleaved")
    ax.set_title("Straight to the host and through a gateway")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    gateways = [s for s in sides if s != "direct"]
    for i, side in enumerate(gateways):
        xs = [r + (i - (len(gateways) - 1) / 2) * 0.35 for r in range(len(rpcs))]
        ratios = [latency[rpc][f"ratio_p50{side.removeprefix('gateway')}"] for rpc in rpcs]
        ax_ratio.bar(xs, ratios, 0.35, label=side, color=GATEWAY_SIDE_COLOR[side])
        for x, ratio in zip(xs, ratios, strict=True):
            ax_ratio.annotate(f"{ratio:.2f}", (x, ratio), fontsize=7, ha="center", va="bottom")
    ax_ratio.axhline(1.5, color="tab:red", linestyle="--", label="target 1.5")
    ax_ratio.set_xticks(range(len(rpcs)), labels, fontsize=8)
    ax_ratio.set_ylabel("gateway p50 / direct p50")
    ax_ratio.set_title("What a gateway costs")
    ax_ratio.set_ylim(bottom=0)
    ax_ratio.grid(True, axis="y", alpha=0.3)
    ax_ratio.legend(fontsize=8)
    return _save(fig, payload, path)


def plot_all(results_dir: Path = RESULTS_DIR) -> list[Path]:
    """Every plot whose results file is present."""
    written = []
    floor = results_dir / "api_floor.json"
    if floor.exists():
        payload = json.loads(floor.read_text())
        for rpc in ("GetVmInfo", "ListVms"):
            written.append(
                plot_api(payload, payload["results"]["summary"], rpc, results_dir / f"api_floor_{rpc}.png")
            )
    load = results_dir / "api_load.json"
    if load.exists():
        payload = json.loads(load.read_text())
        for rpc in ("GetVmInfo", "ListVms"):
            written.append(
                plot_api(payload, api_load_rows(payload), rpc, results_dir / f"api_load_{rpc}.png")
            )
    series = boot_series(results_dir)
    if series:
        written.append(plot_boots(series, results_dir / "boot_times.png"))
    labels = {"": "shared tail", "_before": "before: a log read per watch"}

    def fanout_runs(kind: str) -> list[tuple[str, dict[str, Any]]]:
        files = (
            (label, results_dir / f"watch_fanout{kind}{suffix}.json") for suffix, label in labels.items()
        )
        return [(label, json.loads(f.read_text())) for label, f in files if f.exists()]

    pause_resume = results_dir / "watch_fanout_pause_resume.json"
    if closed := fanout_runs(""):
        if pause_resume.exists():
            closed.append(("shared tail, pause/resume events", json.loads(pause_resume.read_text())))
        written.append(plot_watch_fanout(closed, fanout_runs("_rate30"), results_dir / "watch_fanout.png"))
    parallel = results_dir / "parallel_boots.json"
    if parallel.exists():
        written.append(plot_parallel(json.loads(parallel.read_text()), results_dir / "parallel_boots.png"))
    snapshots = results_dir / "snapshot_boot.json"
    if snapshots.exists():
        written.append(plot_snapshots(json.loads(snapshots.read_text()), results_dir / "snapshot_boot.png"))
    fleet = results_dir / "fleet_gateway.json"
    if fleet.exists():
        written.append(plot_fleet_gateway(json.loads(fleet.read_text()), results_dir / "fleet_gateway.png"))
    return written


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    plot_all(Path(args[0]) if args else RESULTS_DIR)
    return 0


if __name__ == "__main__":
    sys.exit(main())
