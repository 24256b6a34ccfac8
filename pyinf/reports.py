"""What every report of `pyinf demo` and `pyinf eval` records, and how it is written.

`machine_info()`: the device, CPU, library versions and the commit of the pyinf
source when it runs from a git checkout (else "unknown": an installed wheel
carries its version instead). `save_report` writes a report as JSON with that
info under "run"; `pyplot()` and `save_figure` draw and write figures without a display.
"""
from __future__ import annotations

import json
import platform
import subprocess
from pathlib import Path

SOURCE_ROOT = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo, else what `platform` knows)."""
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
    """`module.__version__`, or None when it is not installed (or fails to import)."""
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - not installed, or broken: record None
        return None


def git_commit(root: Path = SOURCE_ROOT) -> str:
    """HEAD of the git checkout at `root` (pyinf's source by default), or "unknown"."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def machine_info() -> dict:
    """{device, cpu_model, torch/triton/numpy/pyinf versions, git_commit} of this run."""
    return {
        "device": device_name(),
        "cpu_model": cpu_model(),
        "torch_version": version("torch"),
        "triton_version": version("triton"),
        "numpy_version": version("numpy"),
        "pyinf_version": version("pyinf"),
        "git_commit": git_commit(),
    }


def save_report(report: dict, path: str | Path) -> Path:
    """`report` as indented JSON at `path` with `machine_info()` under "run"; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**report, "run": machine_info()}, indent=2, default=str))
    return path


def pyplot():
    """matplotlib.pyplot on the Agg backend (figures go to files; no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    """Save a matplotlib figure (tight layout, 90 dpi) and close it; returns the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)
