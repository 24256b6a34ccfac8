// Fused DataInf "norms and dots" pass over a chunk of training gradients.
//
//   s[i]       = ||g_i||^2            (c,)
//   dots[j, i] = <v_j, g_i>           (m, c)
//
// G (c, D) is read exactly once: rows of G are processed in blocks of kRows,
// D is tiled so that a tile of kRows G rows (converted to fp32) sits in L1 while
// the matching tile of every V row streams from L2, and each loaded V element
// feeds kRows FMAs.  OpenMP splits the row blocks across threads; the inner
// loops are `#pragma omp simd` reductions accumulating in fp32.
//
// G may be float32 or bfloat16 (passed as a 16-bit integer buffer holding the
// raw bf16 bits; converted on the fly as `bits << 16` reinterpreted as fp32).
// V and the outputs are float32.  Everything must be C-contiguous.
//
// Portability: the module is compiled for a baseline x86-64 target; with GCC on
// x86-64 the hot routine is additionally cloned for x86-64-v3 (AVX2 + FMA) and
// x86-64-v4 (AVX-512) and picked at load time (target_clones / ifunc), so the
// wheel runs on any x86-64 CPU.  Define PYINF_NO_TARGET_CLONES to disable.

#include <pybind11/pybind11.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && \
    defined(__linux__) && !defined(PYINF_NO_TARGET_CLONES)
#define PYINF_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define PYINF_HAS_CLONES 1
#else
#define PYINF_CLONES
#define PYINF_HAS_CLONES 0
#endif

namespace {

constexpr int64_t kRows = 4;    // G rows per register block
constexpr int64_t kTile = 512;  // D elements per tile (4 rows * 2 KiB in L1)

std::atomic<int> g_num_threads{0};  // 0 = OpenMP default

int default_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

int effective_threads() {
  int n = g_num_threads.load();
  return n > 0 ? n : default_threads();
}

inline float bf16_to_float(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// Rows [r0, r1) of G.  T = float (fp32 rows) or uint16_t (bf16 bits).
// For bf16 each tile of the row block is converted into a small fp32 buffer;
// for fp32 the kernel reads G in place.
template <typename T>
inline void rows_kernel(const T* G, const float* V, float* s, float* dots,
                        int64_t r0, int64_t r1, int64_t c, int64_t m,
                        int64_t D) {
  alignas(64) float conv[kRows * kTile];
  std::vector<float> acc(static_cast<size_t>(kRows * (m + 1)));
  for (int64_t i0 = r0; i0 < r1; i0 += kRows) {
    const int64_t R = std::min<int64_t>(kRows, r1 - i0);
    std::fill(acc.begin(), acc.end(), 0.0f);
    float* sacc = acc.data();        // kRows
    float* dacc = acc.data() + kRows;  // kRows * m, [r * m + j]
    for (int64_t k0 = 0; k0 < D; k0 += kTile) {
      const int64_t L = std::min<int64_t>(kTile, D - k0);
      const float* g[kRows];
      for (int64_t r = 0; r < kRows; ++r) {
        const int64_t rr = r < R ? r : 0;  // pad with row 0, results ignored
        const T* src = G + (i0 + rr) * D + k0;
        if constexpr (std::is_same<T, float>::value) {
          g[r] = src;
        } else {
          float* dst = conv + r * kTile;
          if (r < R) {
#pragma omp simd
            for (int64_t k = 0; k < L; ++k) dst[k] = bf16_to_float(src[k]);
          }
          g[r] = conv + rr * kTile;
        }
      }
      if (R == kRows) {
        const float* __restrict g0 = g[0];
        const float* __restrict g1 = g[1];
        const float* __restrict g2 = g[2];
        const float* __restrict g3 = g[3];
        float n0 = 0.f, n1 = 0.f, n2 = 0.f, n3 = 0.f;
#pragma omp simd reduction(+ : n0, n1, n2, n3)
        for (int64_t k = 0; k < L; ++k) {
          n0 += g0[k] * g0[k];
          n1 += g1[k] * g1[k];
          n2 += g2[k] * g2[k];
          n3 += g3[k] * g3[k];
        }
        sacc[0] += n0; sacc[1] += n1; sacc[2] += n2; sacc[3] += n3;
        for (int64_t j = 0; j < m; ++j) {
          const float* __restrict v = V + j * D + k0;
          float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
          for (int64_t k = 0; k < L; ++k) {
            const float vk = v[k];
            a0 += g0[k] * vk;
            a1 += g1[k] * vk;
            a2 += g2[k] * vk;
            a3 += g3[k] * vk;
          }
          dacc[0 * m + j] += a0;
          dacc[1 * m + j] += a1;
          dacc[2 * m + j] += a2;
          dacc[3 * m + j] += a3;
        }
      } else {
        for (int64_t r = 0; r < R; ++r) {
          const float* __restrict gr = g[r];
          float n = 0.f;
#pragma omp simd reduction(+ : n)
          for (int64_t k = 0; k < L; ++k) n += gr[k] * gr[k];
          sacc[r] += n;
          for (int64_t j = 0; j < m; ++j) {
            const float* __restrict v = V + j * D + k0;
            float a = 0.f;
#pragma omp simd reduction(+ : a)
            for (int64_t k = 0; k < L; ++k) a += gr[k] * v[k];
            dacc[r * m + j] += a;
          }
        }
      }
    }
    for (int64_t r = 0; r < R; ++r) {
      s[i0 + r] = sacc[r];
      for (int64_t j = 0; j < m; ++j) dots[j * c + i0 + r] = dacc[r * m + j];
    }
  }
}

PYINF_CLONES
void rows_f32(const float* G, const float* V, float* s, float* dots, int64_t r0,
              int64_t r1, int64_t c, int64_t m, int64_t D) {
  rows_kernel<float>(G, V, s, dots, r0, r1, c, m, D);
}

PYINF_CLONES
void rows_bf16(const uint16_t* G, const float* V, float* s, float* dots,
               int64_t r0, int64_t r1, int64_t c, int64_t m, int64_t D) {
  rows_kernel<uint16_t>(G, V, s, dots, r0, r1, c, m, D);
}

template <typename T, typename Fn>
void run_parallel(Fn fn, const T* G, const float* V, float* s, float* dots,
                  int64_t c, int64_t m, int64_t D) {
  const int64_t nblocks = (c + kRows - 1) / kRows;
  int nt = effective_threads();
  if (nt > nblocks) nt = static_cast<int>(std::max<int64_t>(1, nblocks));
  if (nt <= 1) {
    fn(G, V, s, dots, 0, c, c, m, D);
    return;
  }
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nt)
#endif
  for (int64_t b = 0; b < nblocks; ++b) {
    const int64_t r0 = b * kRows;
    fn(G, V, s, dots, r0, std::min<int64_t>(c, r0 + kRows), c, m, D);
  }
}

// ---------------------------------------------------------------- validation

enum class Kind { F32, BF16 };

std::string shape_str(const py::buffer_info& b) {
  std::string out = "(";
  for (size_t i = 0; i < b.shape.size(); ++i) {
    if (i) out += ", ";
    out += std::to_string(b.shape[i]);
  }
  if (b.shape.size() == 1) out += ",";
  return out + ")";
}

bool is_c_contiguous(const py::buffer_info& b) {
  py::ssize_t expected = b.itemsize;
  for (py::ssize_t d = b.ndim - 1; d >= 0; --d) {
    if (b.shape[d] > 1 && b.strides[d] != expected) return false;
    expected *= b.shape[d];
  }
  return true;
}

bool is_f32(const py::buffer_info& b) {
  return b.itemsize == 4 && (b.format == "f" || b.format == "<f" ||
                             b.format == "=f");
}

bool is_u16(const py::buffer_info& b) {
  if (b.itemsize != 2) return false;
  const std::string& f = b.format;
  const char ch = f.empty() ? '\0' : f.back();
  return (f.size() == 1 || (f.size() == 2 && (f[0] == '<' || f[0] == '=')))
         && (ch == 'H' || ch == 'h');
}

py::buffer_info request(const py::buffer& obj, const char* name,
                        bool writable) {
  try {
    return obj.request(writable);
  } catch (py::error_already_set& e) {
    throw py::value_error(std::string(name) + ": cannot get a " +
                          (writable ? "writable " : "") + "buffer (" +
                          e.what() + ")");
  } catch (std::exception& e) {
    throw py::value_error(std::string(name) + ": cannot get a " +
                          (writable ? "writable " : "") + "buffer (" +
                          e.what() + ")");
  }
}

void check(const py::buffer_info& b, const char* name, py::ssize_t ndim) {
  if (b.ndim != ndim)
    throw py::value_error(std::string(name) + " must be " +
                          std::to_string(ndim) + "-D, got shape " +
                          shape_str(b));
  if (!is_c_contiguous(b))
    throw py::value_error(std::string(name) + " must be C-contiguous (shape " +
                          shape_str(b) + ")");
}

void norms_and_dots_impl(const py::buffer& G_obj, const py::buffer& V_obj,
                         const py::buffer& s_obj, const py::buffer& d_obj,
                         int force /* -1 auto, 0 f32, 1 bf16 */) {
  py::buffer_info G = request(G_obj, "G", false);
  py::buffer_info V = request(V_obj, "V", false);
  py::buffer_info S = request(s_obj, "s_out", true);
  py::buffer_info Dt = request(d_obj, "dots_out", true);

  Kind kind;
  if (is_f32(G) && force != 1) {
    kind = Kind::F32;
  } else if (is_u16(G) && force != 0) {
    kind = Kind::BF16;
  } else if (force == 1) {
    throw py::value_error(
        "G must hold bfloat16 bits as a 16-bit integer buffer (uint16/int16), "
        "got format '" + G.format + "' itemsize " + std::to_string(G.itemsize));
  } else {
    throw py::value_error(
        "G must be float32, or a 16-bit integer buffer holding bfloat16 bits; "
        "got format '" + G.format + "' itemsize " + std::to_string(G.itemsize));
  }
  if (!is_f32(V))
    throw py::value_error("V must be float32, got format '" + V.format + "'");
  if (!is_f32(S))
    throw py::value_error("s_out must be float32, got format '" + S.format +
                          "'");
  if (!is_f32(Dt))
    throw py::value_error("dots_out must be float32, got format '" +
                          Dt.format + "'");
  check(G, "G", 2);
  check(V, "V", 2);
  check(S, "s_out", 1);
  check(Dt, "dots_out", 2);

  const int64_t c = G.shape[0], D = G.shape[1], m = V.shape[0];
  if (V.shape[1] != D)
    throw py::value_error("V must have D = " + std::to_string(D) +
                          " columns like G " + shape_str(G) + ", got V " +
                          shape_str(V));
  if (S.shape[0] != c)
    throw py::value_error("s_out must have shape (" + std::to_string(c) +
                          ",), got " + shape_str(S));
  if (Dt.shape[0] != m || Dt.shape[1] != c)
    throw py::value_error("dots_out must have shape (" + std::to_string(m) +
                          ", " + std::to_string(c) + ") = (V rows, G rows), got " +
                          shape_str(Dt));

  const float* Vp = static_cast<const float*>(V.ptr);
  float* sp = static_cast<float*>(S.ptr);
  float* dp = static_cast<float*>(Dt.ptr);
  if (c == 0) return;
  py::gil_scoped_release nogil;
  if (D == 0) {
    std::fill(sp, sp + c, 0.0f);
    std::fill(dp, dp + m * c, 0.0f);
    return;
  }
  if (kind == Kind::F32) {
    run_parallel<float>(rows_f32, static_cast<const float*>(G.ptr), Vp, sp, dp,
                        c, m, D);
  } else {
    run_parallel<uint16_t>(rows_bf16, static_cast<const uint16_t*>(G.ptr), Vp,
                           sp, dp, c, m, D);
  }
}

}  // namespace

PYBIND11_MODULE(_C, mod) {
  mod.doc() =
      "pyinf native CPU kernels (pybind11, buffer protocol, OpenMP).\n\n"
      "All functions take numpy-compatible buffers (e.g. tensor.numpy() views)\n"
      "and write into caller-provided float32 outputs; bad inputs raise ValueError.";

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
      "dots_out: float32 (m, c).  All C-contiguous; accumulation in float32.");
  mod.def(
      "norms_and_dots_bf16",
      [](const py::buffer& G, const py::buffer& V, const py::buffer& s_out,
         const py::buffer& dots_out) {
        norms_and_dots_impl(G, V, s_out, dots_out, 1);
      },
      py::arg("G_u16"), py::arg("V"), py::arg("s_out"), py::arg("dots_out"),
      "norms_and_dots_bf16(G_u16, V, s_out, dots_out) -> None\n\n"
      "As norms_and_dots, but G must be a 16-bit integer buffer of bfloat16 bits.");
  mod.def(
      "num_threads", []() { return effective_threads(); },
      "Number of OpenMP threads the kernels use.");
  mod.def(
      "set_num_threads",
      [](int n) {
        if (n < 0)
          throw py::value_error("set_num_threads: n must be >= 0 (0 = default), got " +
                                std::to_string(n));
        g_num_threads.store(n);
      },
      py::arg("n"),
      "Set the number of threads the kernels use (0 restores the OpenMP default).");
  mod.attr("has_openmp") =
#ifdef _OPENMP
      true;
#else
      false;
#endif
  mod.attr("has_target_clones") = static_cast<bool>(PYINF_HAS_CLONES);
}
