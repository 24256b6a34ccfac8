"""Build pyinf.  Metadata and dependencies are in pyproject.toml; this file has
the parts that need code:

* the packages ``pyinf.*``, and the top-level folder ``kernels/`` (Triton
  kernels) installed as ``pyinf.kernels``;
* the optional C++ extension ``pyinf._C`` from ``csrc/*.cpp`` (pybind11 +
  OpenMP, buffer protocol only: no torch headers, so it compiles in seconds).

If the extension cannot be built (no compiler, a compile error, ...) the
install still succeeds and pyinf falls back to PyTorch for its CPU kernels,
unless ``PYINF_REQUIRE_NATIVE=1`` is set, which makes the failure an error.
``PYINF_NO_NATIVE=1`` skips the extension.

Either way the build says what happened where the user sees it:

* ``pyinf/_build_info.json`` is installed beside the extension:
  ``{"native": true}`` or ``{"native": false, "reason": "..."}``; pyinf's one
  runtime warning (``pyinf._native``) quotes that reason;
* a failed build prints the reason to its own stderr (``pip install -v``) and,
  because pip shows a successful build's output only with ``-v``, also to the
  build frontend's stderr when that is a terminal or a pipe (Linux: the parent
  process's fd 2), so a plain ``pip install .`` shows it too.
"""

import glob
import json
import os
import re
import shutil
import stat
import sys
import tempfile
from contextlib import contextmanager

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

BUILD_INFO = "_build_info.json"


def _flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _tell_user(msg):
    """Write `msg` to our stderr and to the build frontend's (pip's) stderr."""
    sys.stderr.write(msg)
    sys.stderr.flush()
    if not sys.platform.startswith("linux"):
        return
    parent = f"/proc/{os.getppid()}/fd/2"
    try:
        st, own = os.stat(parent), os.fstat(2)
        if (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino):
            return  # the frontend streams our stderr already
        # Terminals and pipes only: a regular file opened by a shell `>` has an
        # offset of the frontend's own that would overwrite what we append.
        if stat.S_ISCHR(st.st_mode) or stat.S_ISFIFO(st.st_mode):
            with open(parent, "w") as f:
                f.write(msg)
    except OSError:
        pass


@contextmanager
def _captured_output():
    """Capture fds 1 and 2 (the compiler's output) into a string, replayed afterwards."""
    box = {"text": ""}
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 1)
        os.dup2(tmp.fileno(), 2)
        try:
            yield box
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            tmp.seek(0)
            box["text"] = tmp.read().decode("utf-8", "replace")
            sys.stderr.write(box["text"])


def _first_error(compiler_output):
    """The compiler's first `error` line (file:line: error: ...), or None."""
    for line in compiler_output.splitlines():
        if re.search(r"\b(fatal )?error\b", line, re.I) and not line.lstrip().startswith("#"):
            return line.strip()
    return None


class OptionalBuildExt(build_ext):
    """build_ext that turns a failed native build into a recorded, visible warning."""

    def initialize_options(self):
        super().initialize_options()
        self._reason = None

    def _info_path(self):
        return os.path.join(os.path.dirname(self.get_ext_fullpath("pyinf._C")), BUILD_INFO)

    def _record(self):
        path = self._info_path()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        info = {"native": self._reason is None}
        if self._reason is not None:
            info["reason"] = self._reason
        with open(path, "w") as f:
            json.dump(info, f)

    def get_outputs(self):  # the build record ships in the wheel (and editable installs)
        return super().get_outputs() + [self._info_path()]

    def _fail(self, reason, exc=None):
        if _flag("PYINF_REQUIRE_NATIVE"):
            raise RuntimeError(f"pyinf._C could not be built (PYINF_REQUIRE_NATIVE=1): {reason}") from exc
        self._reason = reason
        stale = self.get_ext_fullpath("pyinf._C")  # an earlier build's, left in build/
        if os.path.exists(stale):
            os.remove(stale)
        bar = "=" * 72
        _tell_user(
            f"\n{bar}\nWARNING: pyinf is installed WITHOUT its C++ extension pyinf._C:\n  {reason}\n"
            "pyinf works, but its CPU passes fall back to PyTorch (slower).\n"
            "Fix the cause and reinstall (pip install --force-reinstall --no-deps <pyinf>);\n"
            "PYINF_REQUIRE_NATIVE=1 makes this an error.\n"
            f"{bar}\n"
        )

    def build_extensions(self):
        ct = self.compiler.compiler_type
        for ext in self.extensions:
            if ct == "unix":
                ext.extra_compile_args = [
                    "-std=c++17",
                    "-O3",
                    "-g0",
                    "-fopenmp",
                    "-pthread",  # csrc/pool.cpp's std::thread (-fopenmp implies it, but may be dropped)
                    "-fvisibility=hidden",
                    "-Wall",
                    "-Wno-unknown-pragmas",
                ]
                if os.uname().machine in ("x86_64", "AMD64"):
                    # portable baseline; hot loops are also cloned for
                    # x86-64-v3/v4 and dispatched at load time (see csrc/).
                    ext.extra_compile_args.append("-march=x86-64-v2")
                ext.extra_link_args = ["-fopenmp", "-pthread"]
            elif ct == "msvc":
                ext.extra_compile_args = ["/std:c++17", "/O2", "/openmp"]
        super().build_extensions()

    def run(self):
        try:
            if _flag("PYINF_NO_NATIVE"):
                self._reason = "PYINF_NO_NATIVE=1 was set when pyinf was installed"
                return
            try:
                import pybind11
            except ImportError as exc:
                return self._fail(
                    "pybind11 is not installed in the build environment "
                    "(pip's isolated build installs it from pyproject.toml; with "
                    "--no-build-isolation, `pip install pybind11` first)", exc)
            for ext in self.extensions:
                ext.include_dirs = [pybind11.get_include(), "csrc"] + ext.include_dirs
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - compiler errors vary
                return self._fail(self._reason or f"{type(exc).__name__}: {exc}", exc)
        finally:
            self._record()

    def _no_compiler(self):
        """'no C++ compiler: ...' when the compiler executable is not found, else None."""
        cmd = getattr(self.compiler, "compiler_so", None) or getattr(self.compiler, "compiler_cxx", None)
        if not cmd:
            return None
        exe = cmd[0]
        if shutil.which(exe) is None:
            return (f"no C++ compiler: {exe!r} was not found (install one, e.g. `apt-get install g++`, "
                    "or point CC/CXX at it)")
        return None

    def build_extension(self, ext):
        missing = self._no_compiler()
        if missing:
            self._reason = missing
            raise RuntimeError(missing)
        # Retry with fewer optional flags (old compilers without
        # -march=x86-64-v2, toolchains without OpenMP) before giving up.
        optional = [["-march=x86-64-v2"], ["-fopenmp"]]
        while True:
            try:
                with _captured_output() as out:
                    super().build_extension(ext)
                return
            except Exception as exc:  # noqa: BLE001 - compiler errors vary
                drop = next((f for f in optional if set(f) & set(ext.extra_compile_args)), None)
                if drop is None:
                    err = _first_error(out["text"])
                    self._reason = f"compiling {ext.name} failed: {err or f'{type(exc).__name__}: {exc}'}"
                    raise
                sys.stderr.write(f"pyinf: retrying {ext.name} without {drop}: {exc}\n")
                ext.extra_compile_args = [a for a in ext.extra_compile_args if a not in drop]
                ext.extra_link_args = [a for a in ext.extra_link_args if a not in drop]


packages = find_packages(include=["pyinf", "pyinf.*"])
if "pyinf.kernels" not in packages:
    packages.append("pyinf.kernels")

setup(
    packages=packages,
    package_dir={"pyinf.kernels": "kernels"},
    ext_modules=[
        Extension(
            "pyinf._C",
            sources=sorted(glob.glob("csrc/*.cpp")),
            depends=sorted(glob.glob("csrc/*.h")),
            language="c++",
        )
    ],
    cmdclass={"build_ext": OptionalBuildExt},
    zip_safe=False,
)
