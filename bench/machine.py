"""What a benchmark ran on: device, versions and commit, for every results JSON."""
from __future__ import annotations

import datetime
import json
import pathlib
import platform
import subprocess

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "bench" / "results"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name() -> str:
    """The GPU's name when CUDA is available, else the CPU model."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name()
    except ImportError:
        pass
    return cpu_model()


def version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - not installed, or broken: record None
        return None


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def machine_info() -> dict:
    return {
        "device": device_name(),
        "cpu_model": cpu_model(),
        "torch_version": version("torch"),
        "triton_version": version("triton"),
        "numpy_version": version("numpy"),
        "git_commit": git_commit(),
    }


def write_result(prefix: str, data: dict, path: str | pathlib.Path | None = None, indent: int = 1) -> pathlib.Path:
    """`data` as JSON at `path`, by default `bench/results/{prefix}-{YYYYmmdd-HHMMSS}.json`; returns the path."""
    out = pathlib.Path(path) if path else RESULTS / f"{prefix}-{datetime.datetime.now():%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=indent))
    return out
