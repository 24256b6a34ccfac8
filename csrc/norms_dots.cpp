// Fused DataInf "norms and dots" pass over a chunk of training gradients:
//
//   s[i]       = ||g_i||^2            (c,)
//   dots[j, i] = <v_j, g_i>           (m, c)
//
// G (c, D) is read exactly once.  The kernel is pass 1 of csrc/passes.cpp
// (blocks of 4 rows, D tiles of 512 converted to fp32 in L1, 4 rows x 2
// queries register blocking, row ranges claimed dynamically by the threads of
// the pool in csrc/pool.h) with
// the squared norms accumulated from the same tiles; this file holds the
// validation and the Python bindings (norms_and_dots, norms_and_dots_bf16).
// With m = 0 it is the sq_norms pass.
//
// G may be float32 or bfloat16 (passed as a 16-bit integer buffer holding the
// raw bf16 bits; converted on the fly as `bits << 16` reinterpreted as fp32).
// V and the outputs are float32.  Every operand is one C-contiguous block, or
// a group of blocks with a leading block axis (common.h: Group), served as one
// job on the pool (passes.cpp: run_group).

#include "common.h"

#include <type_traits>
#include <vector>

namespace py = pybind11;
using namespace pyinf;

namespace {

void norms_and_dots_impl(const py::buffer& G_obj, const py::buffer& V_obj,
                         const py::buffer& s_obj, const py::buffer& d_obj,
                         int force /* -1 auto, 0 f32, 1 bf16 */) {
  py::buffer_info G = request(G_obj, "G", false);
  py::buffer_info V = request(V_obj, "V", false);
  py::buffer_info S = request(s_obj, "s_out", true);
  py::buffer_info Dt = request(d_obj, "dots_out", true);

  const Kind kind = grad_kind(G, "G", force);
  const Group gg = group_of(G, "G", 2, false);
  const Group gv = f32_group(V, "V", 2, false);
  const Group gs = f32_group(S, "s_out", 1, true);
  const Group gd = f32_group(Dt, "dots_out", 2, true);

  const int64_t b = gg.b, c = gg.rows, D = gg.cols, m = gv.rows;
  if (gv.cols != D)
    throw py::value_error("V must have D = " + std::to_string(D) +
                          " columns like G " + shape_str(G) + ", got V " +
                          shape_str(V));
  expect_group(gg, gv, V, "V", m, D, "(m, D of G)");
  expect_group(gg, gs, S, "s_out", 1, c, "(G rows,)");
  expect_group(gg, gd, Dt, "dots_out", m, c, "(V rows, G rows)");

  float* sp = static_cast<float*>(S.ptr);
  float* dp = static_cast<float*>(Dt.ptr);
  if (c == 0 || b == 0) return;
  py::gil_scoped_release nogil;
  if (D == 0) {
    for (int64_t k = 0; k < b; ++k) {
      std::fill(sp + k * gs.stride, sp + k * gs.stride + c, 0.0f);
      std::fill(dp + k * gd.stride, dp + k * gd.stride + m * c, 0.0f);
    }
    return;
  }
  pyinf_norms_dots_pass(kind == Kind::BF16, G.ptr, gg.stride, b, c, D,
                        static_cast<const float*>(V.ptr), gv.stride, m, sp,
                        gs.stride, dp, gd.stride);
}

}  // namespace

void pyinf_register_norms_dots(py::module_& mod) {
  mod.def(
      "norms_and_dots",
      [](const py::buffer& G, const py::buffer& V, const py::buffer& s_out,
         const py::buffer& dots_out) {
        norms_and_dots_impl(G, V, s_out, dots_out, -1);
      },
      py::arg("G"), py::arg("V"), py::arg("s_out"), py::arg("dots_out"),
      "norms_and_dots(G, V, s_out, dots_out) -> None\n\n"
      "One read of G (c, D): s_out[i] = ||G[i]||^2 and dots_out[j, i] = <V[j], G[i]>.\n"
      "G: float32, or a uint16/int16 buffer holding bfloat16 bits (dispatch on\n"
      "the buffer format).  V: float32 (m, D).  s_out: float32 (c,).\n"
      "dots_out: float32 (m, c).  All C-contiguous; accumulation in float32.\n"
      "A group of b blocks: every operand with a leading block axis, (b, c, D),\n"
      "(b, m, D), (b, c), (b, m, c); each block C-contiguous, any block stride.");
  mod.def(
      "norms_and_dots_bf16",
      [](const py::buffer& G, const py::buffer& V, const py::buffer& s_out,
         const py::buffer& dots_out) {
        norms_and_dots_impl(G, V, s_out, dots_out, 1);
      },
      py::arg("G_u16"), py::arg("V"), py::arg("s_out"), py::arg("dots_out"),
      "norms_and_dots_bf16(G_u16, V, s_out, dots_out) -> None\n\n"
      "As norms_and_dots, but G must be a 16-bit integer buffer of bfloat16 bits.");
}
