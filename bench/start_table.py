"""Shared by the start-up benches (standby_start.py, evaluator_start.py): their table of seconds."""

import os
import statistics


def print_start_table(times: dict[str, list[float]], note: str) -> None:
    """The host and its load after the rounds, then median, min and max seconds of each way to start."""
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"host: {os.cpu_count()} cores, load average {load} (after), {note}")
    print(f"{'start':8} | median s | min s | max s | rounds")
    for name, values in times.items():
        print(f"{name:8} | {statistics.median(values):8.3f} | {min(values):5.3f} | {max(values):5.3f} | {len(values)}")
