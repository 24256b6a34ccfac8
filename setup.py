"""Build and install pyinf.

* package ``pyinf`` and its subpackages;
* the top-level source folder ``kernels/`` (Triton kernels) as ``pyinf.kernels``;
* the optional C++ extension ``pyinf._C`` from ``csrc/*.cpp`` (pybind11 + OpenMP,
  buffer protocol only: no torch headers, so it compiles in seconds).

If the extension cannot be built (no compiler, no pybind11, ...) the install
still succeeds with a warning and pyinf falls back to PyTorch, unless the
environment variable ``PYINF_REQUIRE_NATIVE=1`` is set, in which case the build
failure is an error.  ``PYINF_NO_NATIVE=1`` skips the extension altogether.
"""

import glob
import os
import sys

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


REQUIRE_NATIVE = _flag("PYINF_REQUIRE_NATIVE")
NO_NATIVE = _flag("PYINF_NO_NATIVE")


def _pybind11_include():
    try:
        import pybind11
    except ImportError:  # resolved (or reported) at build time
        return []
    return [pybind11.get_include()]


class OptionalBuildExt(build_ext):
    """build_ext that turns a failed native build into a warning."""

    def _fail(self, ext, exc):
        msg = (
            f"\n{'=' * 72}\nWARNING: building the optional extension {ext.name} failed:\n"
            f"  {type(exc).__name__}: {exc}\n"
            "pyinf is installed without it and falls back to PyTorch.\n"
            "Set PYINF_REQUIRE_NATIVE=1 to make this an error.\n"
            f"{'=' * 72}\n"
        )
        if REQUIRE_NATIVE:
            raise exc
        sys.stderr.write(msg)

    def build_extensions(self):
        ct = self.compiler.compiler_type
        for ext in self.extensions:
            if ct == "unix":
                ext.extra_compile_args = [
                    "-std=c++17",
                    "-O3",
                    "-g0",
                    "-fopenmp",
                    "-fvisibility=hidden",
                    "-Wall",
                    "-Wno-unknown-pragmas",
                ]
                if os.uname().machine in ("x86_64", "AMD64"):
                    # portable baseline; hot loops are also cloned for
                    # x86-64-v3/v4 and dispatched at load time (see csrc/).
                    ext.extra_compile_args.append("-march=x86-64-v2")
                ext.extra_link_args = ["-fopenmp"]
            elif ct == "msvc":
                ext.extra_compile_args = ["/std:c++17", "/O2", "/openmp"]
        super().build_extensions()

    def run(self):
        try:
            import pybind11  # noqa: F401
        except ImportError as exc:
            if self.extensions:
                self._fail(self.extensions[0], exc)
            return
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - compiler errors vary
            self._fail(self.extensions[0] if self.extensions else Extension("pyinf._C", []), exc)

    def build_extension(self, ext):
        # Retry with fewer optional flags (old compilers without
        # -march=x86-64-v2, toolchains without OpenMP) before giving up.
        optional = [["-march=x86-64-v2"], ["-fopenmp"]]
        while True:
            try:
                super().build_extension(ext)
                return
            except Exception as exc:  # noqa: BLE001 - compiler errors vary
                drop = next(
                    (f for f in optional if set(f) & set(ext.extra_compile_args)), None
                )
                if drop is None:
                    self._fail(ext, exc)
                    return
                sys.stderr.write(f"pyinf: retrying {ext.name} without {drop}: {exc}\n")
                ext.extra_compile_args = [a for a in ext.extra_compile_args if a not in drop]
                ext.extra_link_args = [a for a in ext.extra_link_args if a not in drop]


ext_modules = []
if not NO_NATIVE:
    ext_modules.append(
        Extension(
            "pyinf._C",
            sources=sorted(glob.glob("csrc/*.cpp")),
            include_dirs=_pybind11_include() + ["csrc"],
            language="c++",
        )
    )

packages = find_packages(include=["pyinf", "pyinf.*"])
if os.path.isdir(os.path.join(HERE, "kernels")) and "pyinf.kernels" not in packages:
    packages.append("pyinf.kernels")

setup(
    name="pyinf",
    version="0.1.0",
    description="Influence functions (DataInf, HyperINF, TracIn, LiSSA, exact) on LoRA per-sample gradients",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=packages,
    package_dir={"pyinf.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass={"build_ext": OptionalBuildExt},
    install_requires=["numpy"],
    extras_require={
        "compat": ["pandas"],
        "test": ["pytest", "pytest-benchmark", "hypothesis", "pandas"],
    },
    entry_points={"console_scripts": ["pyinf=pyinf.cli:main"]},
    zip_safe=False,
)
