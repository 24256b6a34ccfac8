"""What a benchmark ran on: device, versions and commit, for every results JSON."""
from __future__ import annotations

import datetime
import json
import pathlib

from pyinf import reports
from pyinf.reports import cpu_model, device_name, version

__all__ = ["REPO_ROOT", "RESULTS", "cpu_model", "device_name", "version", "git_commit", "machine_info", "write_result"]

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "bench" / "results"


def git_commit() -> str:
    """HEAD of this checkout (the benchmarks' commit; an installed pyinf has no git of its own)."""
    return reports.git_commit(REPO_ROOT)


def machine_info() -> dict:
    """`pyinf.reports.machine_info()` with this checkout's commit."""
    return {**reports.machine_info(), "git_commit": git_commit()}


def write_result(prefix: str, data: dict, path: str | pathlib.Path | None = None, indent: int = 1) -> pathlib.Path:
    """`data` as JSON at `path`, by default `bench/results/{prefix}-{YYYYmmdd-HHMMSS}.json`; returns the path."""
    out = pathlib.Path(path) if path else RESULTS / f"{prefix}-{datetime.datetime.now():%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=indent))
    return out
