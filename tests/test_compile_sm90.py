"""Every Triton kernel of the installed `pyinf.kernels` compiles for sm_90 (H100 / H200), without a GPU.

Runs `bench/compile_sm90.py` (see its docstring) in a subprocess, with
TRITON_INTERPRET removed from the environment (this suite sets it to 1 in
conftest.py; the compile check needs the real JIT functions and the GPU launch
configs):

* with this interpreter, i.e. the installed Triton;
* with the interpreter named by ``PYINF_TRITON36_PYTHON``, when set: a Python
  with triton 3.6.0 (the GPU machines' version) and torch, e.g.
  ``python3 -m venv /tmp/t36 && /tmp/t36/bin/pip install torch==2.13.0 triton==3.6.0 numpy``.
  pyinf need not be installed there: the kernels folder of the installed
  package is passed with ``--kernels``.

Fails on a compile error, a kernel that no case launches, or register spills
in a default (non-opt-in) config at the Llama-2-13B shapes (every config of
an autotuned launcher counts as default). Each run takes two to five minutes
on a 2-core machine.
"""
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("triton")

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "bench" / "compile_sm90.py"
TIMEOUT_S = 1800


def _kernels_dir() -> str:
    return importlib.util.find_spec("pyinf.kernels").submodule_search_locations[0]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYINF_TRITON_PRECISION")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # nothing written into the installed package
    return env


def _pythons():
    yield pytest.param(sys.executable, [], id="installed-triton")
    t36 = os.environ.get("PYINF_TRITON36_PYTHON")
    yield pytest.param(t36, ["--kernels", _kernels_dir()], id="triton-3.6",
                       marks=pytest.mark.skipif(not t36, reason="PYINF_TRITON36_PYTHON is not set"))


@pytest.mark.parametrize("python,extra", list(_pythons()))
def test_kernels_compile_for_sm90(python, extra, tmp_path):
    if python != sys.executable:
        version = subprocess.run([python, "-c", "import triton; print(triton.__version__)"], env=_env(),
                                 capture_output=True, text=True, timeout=300)
        assert version.returncode == 0, f"{python}: cannot import triton:\n{version.stderr[-2000:]}"
        assert version.stdout.strip().startswith("3.6"), f"{python} has triton {version.stdout.strip()}, not 3.6"
    out = tmp_path / "compile-sm90.json"
    proc = subprocess.run([python, str(SCRIPT), "--json", str(out), *extra], env=_env(), cwd=tmp_path,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    log = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert out.exists(), f"no results written (exit {proc.returncode}):\n{log}"
    run = json.loads(out.read_text())
    assert run["failures"] == [], "\n".join(run["failures"]) + "\n" + log
    assert proc.returncode == 0, log
    s = run["summary"]
    assert s["compile_errors"] == 0 and s["default_spills"] == 0
    kernels = {r["kernel"].split(".")[-1] for r in run["results"]}
    assert {"_gram_kernel", "_gfim_kernel", "_norms_dots_kernel", "_weighted_sum_kernel", "_schulz_gemm_kernel",
            "_grouped_lora_kernel", "_per_sample_outer_kernel"} <= kernels
    default = [r for r in run["results"] if r["class"] == "default"]
    assert default and all(r["ok"] and r["spill_stores"] == 0 and r["spill_loads"] == 0 for r in default)
    assert any(r["mma"].startswith("wgmma") for r in default), "no default config uses Hopper's wgmma"
    _check_access_widths_and_grids(default)
    sd = {c.split(" SD-1.5 ")[0] for r in default for c in r["cases"] if " SD-1.5 " in c}  # issue 16's UNet shapes
    assert sd == {f"per_sample_outer {tag}" for tag in ("fp32", "bf16", "fp16")}, sd
    _check_autotuned_configs(default)


def _check_access_widths_and_grids(default):
    """Issue 13's kernel findings, at the 13B shapes (c = 900, not a multiple of 16; m = 100; one group)."""
    by = lambda name: [r for r in default if r["kernel"].endswith(name)]  # noqa: E731
    for r in by("._weighted_sum_kernel"):  # P (padded rows) and G: 16-byte loads, never 4-byte scalars
        assert r["gmem"]["cp.async"] == [16], (r["cases"][0], r["gmem"])
    for r in by("._norms_dots_kernel"):
        if "COMPUTE_NORMS=False" in r["specialisation"]:  # the dots alone: 16-byte stores of the padded rows
            assert r["gmem"]["st"] == [16], (r["cases"][0], r["gmem"])
        # the programs per SM that norms_dots._config counts on to size its waves
        assert r["blocks_per_sm"] >= (1 if r["num_warps"] == 8 else 4), (r["cases"][0], r["blocks_per_sm"])
    # the block group of the 13B shape (160 blocks of c = 20, m = 100, bf16): each primitive one launch
    mine = ("sq_norms", "norms_dots", "score", "rank_one_accumulate", "weighted_sum")
    groups = {c for r in default for c in r["cases"] if "b=160 c=20" in c and c.startswith(mine)}
    assert len(groups) == 5, groups  # compiled as default configs: no spills, the widths above
    one_group = [r for r in by("._grouped_lora_kernel") if "k=1" in " ".join(r["cases"])]
    assert one_group and all(r["grid"][0] * r["grid"][1] >= 132 for r in one_group), "one group leaves SMs idle"
    # Schulz on k × k padded to a multiple of 16: 16-byte accesses at k = 900 too (they were 4-byte scalars);
    # the residual's one Σ R² per program is the 4-byte store
    schulz = by("._schulz_gemm_kernel")
    assert {c.split(" [")[0] for r in schulz for c in r["cases"]} >= {"schulz residual k=900", "schulz update k=900"}
    for r in schulz:
        g = r["gmem"]
        assert g["cp.async"] == [16] and g["ld"] in ([], [16]) and 16 in g["st"] and set(g["st"]) <= {4, 16}, (
            r["cases"][0], g)
    # fp16 gradients: one exact fp16 MMA, as bf16 (they went through tf32x3)
    fp16 = [r for r in by("._gram_kernel") + by("._gfim_kernel") if " fp16 " in r["cases"][0]]
    assert fp16 and all(r["mma_detail"].endswith(".f16") for r in fp16), [(r["cases"][0], r["mma"]) for r in fp16]


def _check_autotuned_configs(default):
    """Every config the autotuner may pick on a GPU is compiled as a default config (so it may not spill)."""
    from pyinf.kernels import gfim, gram, schulz

    def tags(configs):
        return {f"{'x'.join(map(str, c[:-2]))} w{c[-2]} s{c[-1]}" for c in configs}

    for case, configs in (("gram bf16 c=900 D=40960", gram.TILES_16), ("gram fp32 c=900 D=40960", gram.TILES_32),
                          ("gfim fp16 c=900 8x5120", gfim.TILES_16), ("gfim fp32 c=900 8x5120", gfim.TILES_32),
                          ("schulz residual k=900", schulz.TILES), ("schulz update k=5120", schulz.TILES)):
        compiled = {c.split(" [tile ")[1].rstrip("]") for r in default for c in r["cases"]
                    if c.startswith(case + " [tile ")}
        assert compiled == tags(configs), (case, compiled)
