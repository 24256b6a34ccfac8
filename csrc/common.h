// Shared helpers of the pyinf._C kernels: thread count, bf16 conversion,
// 8-lane float vectors, buffer validation.  Header-only (inline), included by
// every csrc/*.cpp; the module itself is defined in csrc/bindings.cpp.
//
// Conventions of every kernel:
//  * training gradients G (c, D) are float32, or bfloat16 passed as a 16-bit
//    integer buffer (uint16/int16) holding the raw bits, converted on the fly
//    (`bits << 16`); everything else (queries, weights, outputs) is float32;
//    accumulation is float32;
//  * every buffer is C-contiguous (any object exporting the buffer protocol:
//    numpy arrays and memmaps, tensor.numpy() views), or a group of blocks
//    (see Group below) each C-contiguous; nothing is copied;
//  * bad inputs raise ValueError; the GIL is released around the kernels.
//
// Portability: the module is compiled for a baseline x86-64 target; with GCC on
// x86-64 the hot routines are additionally cloned for x86-64-v3 (AVX2 + FMA)
// and x86-64-v4 (AVX-512) and picked at load time (target_clones / ifunc).
// Define PYINF_NO_TARGET_CLONES to disable.  The 8-lane vectors are GCC/Clang
// vector extensions (256-bit: native on AVX2, and the width Zen 4 executes
// AVX-512 at anyway).
#pragma once

#include <pybind11/pybind11.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <string>

#ifdef _OPENMP
#include <omp.h>
#elif defined(__linux__)
#include <sched.h>
#endif

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && \
    defined(__linux__) && !defined(PYINF_NO_TARGET_CLONES)
#define PYINF_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define PYINF_HAS_CLONES 1
#else
#define PYINF_CLONES
#define PYINF_HAS_CLONES 0
#endif

#define PYINF_INLINE inline __attribute__((always_inline))

#if defined(__GNUC__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace pyinf {

namespace py = pybind11;

// ------------------------------------------------------------------ threads
// The passes run on the pool of csrc/pool.h (not OpenMP parallel regions: see
// there why); OpenMP only supplies the default thread count, so that
// OMP_NUM_THREADS (and torch.set_num_threads, which sets it in the libgomp
// that torch and pyinf._C share) apply to pyinf as to torch.

inline std::atomic<int>& thread_setting() {
  static std::atomic<int> n{0};  // 0 = default
  return n;
}

inline int default_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#elif defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return 1;
#else
  return 1;
#endif
}

inline int effective_threads() {
  int n = thread_setting().load();
  return n > 0 ? n : default_threads();
}

// ------------------------------------------------------------- conversions

PYINF_INLINE float bf16_to_float(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

PYINF_INLINE float to_float(float x) { return x; }
PYINF_INLINE float to_float(uint16_t x) { return bf16_to_float(x); }

typedef float vf8 __attribute__((vector_size(32)));
typedef uint32_t vu8 __attribute__((vector_size(32)));
typedef uint16_t vh8 __attribute__((vector_size(16)));

PYINF_INLINE vf8 load8(const float* p) {
  vf8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

PYINF_INLINE vf8 load8(const uint16_t* p) {  // 8 bf16 -> 8 fp32
  vh8 h;
  std::memcpy(&h, p, sizeof(h));
  const vu8 u = __builtin_convertvector(h, vu8) << 16;
  return (vf8)u;  // same-size vector cast: reinterprets the bits
}

PYINF_INLINE void store8(float* p, const vf8& v) { std::memcpy(p, &v, sizeof(v)); }

PYINF_INLINE vf8 splat8(float s) { return vf8{} + s; }

PYINF_INLINE float hsum8(const vf8& v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

// -------------------------------------------------------------- validation

enum class Kind { F32, BF16 };

inline std::string shape_str(const py::buffer_info& b) {
  std::string out = "(";
  for (size_t i = 0; i < b.shape.size(); ++i) {
    if (i) out += ", ";
    out += std::to_string(b.shape[i]);
  }
  if (b.shape.size() == 1) out += ",";
  return out + ")";
}

inline bool is_f32(const py::buffer_info& b) {
  return b.itemsize == 4 &&
         (b.format == "f" || b.format == "<f" || b.format == "=f");
}

inline bool is_u16(const py::buffer_info& b) {
  if (b.itemsize != 2) return false;
  const std::string& f = b.format;
  const char ch = f.empty() ? '\0' : f.back();
  return (f.size() == 1 || (f.size() == 2 && (f[0] == '<' || f[0] == '='))) &&
         (ch == 'H' || ch == 'h');
}

inline py::buffer_info request(const py::buffer& obj, const char* name,
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

// The storage kind of a gradient buffer: force -1 auto, 0 f32, 1 bf16 bits.
inline Kind grad_kind(const py::buffer_info& G, const char* name, int force) {
  if (is_f32(G) && force != 1) return Kind::F32;
  if (is_u16(G) && force != 0) return Kind::BF16;
  if (force == 1)
    throw py::value_error(
        std::string(name) +
        " must hold bfloat16 bits as a 16-bit integer buffer (uint16/int16), "
        "got format '" + G.format + "' itemsize " + std::to_string(G.itemsize));
  throw py::value_error(
      std::string(name) +
      " must be float32, or a 16-bit integer buffer holding bfloat16 bits; "
      "got format '" + G.format + "' itemsize " + std::to_string(G.itemsize));
}

// ------------------------------------------------------------------ groups
// The backends' batch axis: a buffer of `nd` dims (2: a matrix, 1: a vector)
// is one block; of nd + 1 dims, a group (b, ...) of b same-shape blocks.
// Every block is row-major contiguous; the block stride may be anything >= 0
// (a group that is a view of a bigger chunk is read in place), but the blocks
// of an output must not overlap.
struct Group {
  bool batched;
  int64_t b, rows, cols;  // rows = 1 for vectors
  int64_t stride;         // block stride, in elements
};

inline Group group_of(const py::buffer_info& info, const char* name,
                      py::ssize_t nd, bool writable) {
  if (info.ndim != nd && info.ndim != nd + 1)
    throw py::value_error(std::string(name) + " must be " + std::to_string(nd) +
                          "-D, or " + std::to_string(nd + 1) +
                          "-D for a group of blocks, got shape " + shape_str(info));
  Group g;
  g.batched = info.ndim == nd + 1;
  const py::ssize_t o = g.batched ? 1 : 0, is = info.itemsize;
  g.b = g.batched ? info.shape[0] : 1;
  g.cols = info.shape[info.ndim - 1];
  g.rows = nd == 2 ? info.shape[o] : 1;
  if (!((g.cols <= 1 || info.strides[info.ndim - 1] == is) &&
        (nd == 1 || g.rows <= 1 || info.strides[o] == g.cols * is)))
    throw py::value_error(std::string(name) + " must be C-contiguous" +
                          (g.batched ? " in each block" : "") + " (shape " +
                          shape_str(info) + ")");
  g.stride = g.rows * g.cols;
  if (g.batched && g.b > 1) {
    const py::ssize_t s0 = info.strides[0];
    if (s0 < 0 || s0 % is != 0)
      throw py::value_error(std::string(name) +
                            ": the block stride must be a non-negative multiple "
                            "of the item size, got " + std::to_string(s0) + " bytes");
    g.stride = s0 / is;
    if (writable && g.stride < g.rows * g.cols)
      throw py::value_error(std::string(name) + ": its blocks overlap (block stride " +
                            std::to_string(g.stride) + " < " +
                            std::to_string(g.rows * g.cols) + " elements)");
  }
  return g;
}

// A float32 group (queries, weights, outputs).
inline Group f32_group(const py::buffer_info& info, const char* name,
                       py::ssize_t nd, bool writable) {
  if (!is_f32(info))
    throw py::value_error(std::string(name) + " must be float32, got format '" +
                          info.format + "'");
  return group_of(info, name, nd, writable);
}

// `x` has the block axis of G (both one block, or both groups of G.b) and
// blocks of (rows, cols).
inline void expect_group(const Group& G, const Group& x, const py::buffer_info& info,
                         const char* name, int64_t rows, int64_t cols,
                         const char* what) {
  if (x.batched != G.batched || x.b != G.b || x.rows != rows || x.cols != cols) {
    const bool matrix = info.ndim - (x.batched ? 1 : 0) == 2;
    std::string want = G.batched ? "(" + std::to_string(G.b) + ", " : "(";
    if (matrix) want += std::to_string(rows) + ", ";
    want += std::to_string(cols) + (G.batched || matrix ? ")" : ",)");
    throw py::value_error(std::string(name) + " must have shape " + want +
                          (what[0] ? std::string(" = ") + what : std::string()) +
                          ", got " + shape_str(info));
  }
}

}  // namespace pyinf

// Each kernel file registers its functions on the module.
void pyinf_register_norms_dots(pybind11::module_& mod);
void pyinf_register_passes(pybind11::module_& mod);

// Pass 1 of csrc/passes.cpp with the squared norms, per block k < b of a
// group: norms[k][i] = ||g_i||^2, dots[k][j, i] = <v_j, g_i>; block k's
// operands start k block strides (in elements) after block 0's.  Called
// without the GIL, all pointers valid.
void pyinf_norms_dots_pass(bool bf16, const void* G, int64_t sG, int64_t b,
                           int64_t c, int64_t D, const float* V, int64_t sV,
                           int64_t m, float* norms, int64_t sN, float* dots,
                           int64_t sD);
