"""Chrome/Perfetto trace JSON ("Trace Event Format") of a simulated or measured iteration.

Open the file at https://ui.perfetto.dev or chrome://tracing: one process per replica, one
thread per device (an encoder group or an LLM stage), one slice per forward or backward.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable


def chrome_trace(events: Iterable[tuple[str, str, float, float]], name: str = "entrain") -> dict:
    """Trace events from (device, action, start s, end s); devices named "module/rK"."""
    out = []
    threads: dict[tuple[int, str], int] = {}
    for device, action, start, end in events:
        module, _, replica = device.partition("/r")
        pid = int(replica) if replica.isdigit() else 0
        tid = threads.setdefault((pid, module), len(threads))
        out.append(
            {
                "name": action,
                "cat": action[:1],
                "ph": "X",
                "pid": pid,
                "tid": tid,
                "ts": start * 1e6,
                "dur": max(end - start, 0.0) * 1e6,
                "args": {"device": device},
            }
        )
    for (pid, module), tid in threads.items():
        out.append(
            {"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": module}}
        )
    pids = {pid for pid, _ in threads}
    out += [
        {"name": "process_name", "ph": "M", "pid": p, "args": {"name": f"{name} replica {p}"}}
        for p in pids
    ]
    return {"traceEvents": out, "displayTimeUnit": "ms"}


def write_chrome_trace(
    events: Iterable[tuple[str, str, float, float]], path: str | os.PathLike, name: str = "entrain"
) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(chrome_trace(events, name), f)
