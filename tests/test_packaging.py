"""pyinf installs as a library: the sdist has everything a wheel is built from,
a wheel built from it ships pyinf._C and pyinf.kernels, and a build without a
compiler installs, names the cause in pip's plain (non -v) log and in the one
runtime warning.

Builds run without build isolation (pybind11, setuptools and wheel come with
the `test` extra), from an sdist of the repository the tests run from.
"""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import tarfile
import zipfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
pytest.importorskip("build")
pytest.importorskip("pybind11")
if not (REPO / "pyproject.toml").exists():  # pragma: no cover - tests copied without the repo
    pytest.skip("needs the source repository", allow_module_level=True)


def _run(cmd, env=None, cwd=None):
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=cwd)
    assert res.returncode == 0, f"{cmd} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    out = tmp_path_factory.mktemp("sdist")
    # a copy of the tracked tree, so that no build output lands in the repository
    src = out / "src"
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True)
    if listed.returncode != 0:
        pytest.skip("needs the git checkout of the repository")
    files = listed.stdout
    for rel in filter(None, files.decode().split("\0")):
        if (REPO / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            (src / rel).write_bytes((REPO / rel).read_bytes())
    _run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(out), str(src)])
    (path,) = out.glob("pyinf-*.tar.gz")
    return path


def test_sdist_has_sources_headers_and_kernels(sdist):
    names = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
    for rel in ("pyproject.toml", "setup.py", "README.md", "LICENSE", "csrc/common.h", "kernels/_util.py"):
        assert rel in names, rel
    for cpp in (REPO / "csrc").glob("*.cpp"):
        assert f"csrc/{cpp.name}" in names
    for k in (REPO / "kernels").glob("*.py"):
        assert f"kernels/{k.name}" in names


def _wheel(sdist, out, env=None):
    res = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(sdist)],
               env=env)
    (whl,) = out.glob("pyinf-*.whl")
    return whl, res.stdout + res.stderr


def _installed_run(whl, target, code):
    """Unpack the wheel into `target` and run `code` there from another folder (not the repository)."""
    zipfile.ZipFile(whl).extractall(target)
    env = {**os.environ, "PYTHONPATH": str(target)}
    env.pop("PYINF_REQUIRE_NATIVE", None)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=target.parent)


def test_wheel_from_sdist_ships_extension_and_kernels(sdist, tmp_path):
    whl, _ = _wheel(sdist, tmp_path, env={"PYINF_REQUIRE_NATIVE": "1"})
    names = zipfile.ZipFile(whl).namelist()
    assert any(n.startswith("pyinf/_C") and n.endswith((".so", ".pyd")) for n in names), names
    assert "pyinf/kernels/gfim.py" in names and "pyinf/_build_info.json" in names
    res = _installed_run(whl, tmp_path / "site", "import pyinf, pyinf._C, pyinf.kernels, pyinf._native as n;"
                                                 "print(pyinf.__file__, n.build_info())")
    assert res.returncode == 0, res.stderr
    assert str(tmp_path / "site") in res.stdout and "'native': True" in res.stdout


def test_no_compiler_installs_and_names_the_cause(sdist, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYINF_REQUIRE_NATIVE"}
    env.update(CC="/nonexistent/cc", CXX="/nonexistent/c++")
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                          str(tmp_path), str(sdist)], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    log = res.stdout + res.stderr  # pip without -v: the build's own output is hidden
    assert "WITHOUT its C++ extension" in log and "no C++ compiler" in log and "/nonexistent/c" in log, log
    (whl,) = tmp_path.glob("pyinf-*.whl")
    assert not any(n.startswith("pyinf/_C") for n in zipfile.ZipFile(whl).namelist())
    code = ("import warnings, torch, pyinf; warnings.simplefilter('always');"
            "print(pyinf.influence({'a': torch.ones(3, 4)}, {'a': torch.ones(1, 4)}, method='tracin'))")
    run = _installed_run(whl, tmp_path / "site", code)
    assert run.returncode == 0, run.stderr
    warns = [ln for ln in run.stderr.splitlines() if "RuntimeWarning" in ln]
    assert len(warns) == 1 and "no C++ compiler" in warns[0] and "not built when pyinf was installed" in warns[0], \
        run.stderr
