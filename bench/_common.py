"""Shared helpers for the benchmark scripts: timing, peak memory, machine description, result files."""

from __future__ import annotations

import argparse

import json
import os
import platform
import resource
import time
from pathlib import Path
from typing import Callable, TypeVar

T = TypeVar("T")

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    import torch

    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{os.cpu_count()} cores ({cpu}), torch {torch.__version__} with {torch.get_num_threads()} threads, "
            f"Python {platform.python_version()}")


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def per_second(store: dict, key: str, n: int, fn: Callable[[], T]) -> T:
    """Run ``fn`` once, record ``n`` items per second of it under ``store[key]``, return its result."""
    t = time.perf_counter()
    out = fn()
    store[key] = n / (time.perf_counter() - t)
    return out


def model_and_data_args(doc: str, **options: int) -> argparse.Namespace:
    """The command line of a bench over a model and Flickr8k: ``-m/--model`` (default ``conse``), ``--data``
    (``../shared/data/flickr8k``) and one integer option per keyword (its default)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("-m", "--model", default="conse")
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k")
    for name, default in options.items():
        parser.add_argument(f"--{name}", type=int, default=default)
    return parser.parse_args()


def source_commit() -> str:
    """The repository's commit (``-dirty`` with uncommitted changes), or ``unknown`` outside a git checkout."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit


def save(name: str, payload: dict) -> Path:
    """Write ``results/<name>.json``: the payload with the machine, when it was measured (UTC) and the commit."""
    from datetime import datetime, timezone

    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"machine": machine(), "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "commit": source_commit(), **payload}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"saved {path}")
    return path


def table(rows: list[tuple], header: tuple) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)
