// The module pyinf._C: one PYBIND11_MODULE; each kernel file registers its
// functions (see common.h for the conventions they share).

#include "common.h"
#include "pool.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, mod) {
  mod.doc() =
      "pyinf native CPU kernels (pybind11, buffer protocol, OpenMP).\n\n"
      "All functions take numpy-compatible buffers (e.g. tensor.numpy() views,\n"
      "numpy memmaps) and write into caller-provided float32 outputs; bad inputs\n"
      "raise ValueError.  Gradients G: float32, or bfloat16 bits in a\n"
      "uint16/int16 buffer; accumulation in float32.";

  pyinf_register_norms_dots(mod);
  pyinf_register_passes(mod);

  mod.def(
      "num_threads", []() { return pyinf::effective_threads(); },
      "Number of threads the kernels use (the calling thread included).");
  mod.def(
      "set_num_threads",
      [](int n) {
        if (n < 0)
          throw py::value_error(
              "set_num_threads: n must be >= 0 (0 = default), got " +
              std::to_string(n));
        pyinf::thread_setting().store(n);
      },
      py::arg("n"),
      "Set the number of threads the kernels use (0 restores the default:\n"
      "omp_get_max_threads(), i.e. OMP_NUM_THREADS or the CPUs available).");
  mod.def(
      "_pool_workers", []() { return pyinf::pool_workers(); },
      "Worker threads started so far by the kernels' pool (diagnostics).");
  mod.attr("has_openmp") =
#ifdef _OPENMP
      true;
#else
      false;
#endif
  mod.attr("has_target_clones") = static_cast<bool>(PYINF_HAS_CLONES);
}
