"""Totals from Firecracker's metrics file.

Firecracker appends one JSON object per flush (every 60 s, and on the FlushMetrics action). Its
counters are deltas since the previous flush, so totals since the VMM started are sums over all
lines; the file is emptied before each start. Read incrementally: each call parses only new lines.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# (section, counter) -> field of MetricTotals; "block" and "net" aggregate every drive / interface.
_COUNTERS = {
    ("block", "read_bytes"): "disk_read_bytes",
    ("block", "write_bytes"): "disk_write_bytes",
    ("net", "rx_bytes_count"): "network_rx_bytes",
    ("net", "tx_bytes_count"): "network_tx_bytes",
}


@dataclass
class MetricTotals:
    disk_read_bytes: int = 0
    disk_write_bytes: int = 0
    network_rx_bytes: int = 0
    network_tx_bytes: int = 0


class MetricsReader:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.totals = MetricTotals()
        self._position = 0

    def _add(self, line: dict[str, Any]) -> None:
        for (section, counter), field in _COUNTERS.items():
            values = line.get(section)
            value = values.get(counter) if isinstance(values, dict) else None
            if isinstance(value, int):
                setattr(self.totals, field, getattr(self.totals, field) + value)

    def _read(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            if os.fstat(fd).st_size < self._position:  # emptied by a restart
                self.totals, self._position = MetricTotals(), 0
            data = b""
            while chunk := os.pread(fd, 1 << 20, self._position + len(data)):
                data += chunk
        finally:
            os.close(fd)
        complete = data[: data.rfind(b"\n") + 1]  # a line still being written waits for the next read
        self._position += len(complete)
        for raw in complete.splitlines():
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            if isinstance(line, dict):
                self._add(line)

    async def read(self) -> MetricTotals:
        await asyncio.to_thread(self._read)
        return self.totals
