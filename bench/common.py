"""What every benchmark shares: percentiles, figures as text, the machine a run measured on, JSON reports, and
comma-separated option values.

Numpy and the standard library only, so that any bench (and bench/gpu_check.py, after its smoke test) can import it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

PERCENTILES = (50, 95, 99)


# ---- statistics ---------------------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between the closest ranks (numpy's default method)."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def distribution(values: Sequence[float], quantiles: Sequence[int] = PERCENTILES) -> dict[str, float | None]:
    """p50/p95/p99/max (or the given percentiles and max) of the values (None for each when there are none)."""
    if not values:
        return {**{f"p{q}": None for q in quantiles}, "max": None}
    return {**{f"p{q}": percentile(values, q) for q in quantiles}, "max": max(values)}


# ---- reporting ----------------------------------------------------------------------------------------------------


def figure(value: float | None, digits: int = 1) -> str:
    """A figure for a table: `-` where there is none (no blocks, no audio, a process that was not there)."""
    return "-" if value is None else f"{value:.{digits}f}"


def machine_meta(load_1min: tuple[float, float]) -> dict[str, Any]:
    """What every report records about the machine: its cores, and the 1-minute load average before and after the run
    (other work on a shared machine makes the figures noisy; above the core count means contention)."""
    return {"cpus": os.cpu_count(), "load_average_1min": list(load_1min)}


def json_default(value: Any) -> Any:
    """JSON for what the reports hold besides plain types: numpy scalars and dataclasses."""
    if isinstance(value, np.generic):
        return value.item()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_json(path: Path, document: Any, what: str = "report") -> None:
    """The document as indented JSON at `path`, and a line saying so."""
    path.write_text(json.dumps(document, indent=2, default=json_default) + "\n")
    print(f"{what} written to {path}")


# ---- command line -------------------------------------------------------------------------------------------------


def positive_ints(text: str) -> tuple[int, ...]:
    """An argparse type: `1,8,32` -> (1, 8, 32); every value at least 1."""
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,8,32, got {text!r}")
    return values
