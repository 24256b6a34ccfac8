// The streaming passes over a chunk of training gradients G (c, D):
//
//   dots(G, V, out, alpha)           out[j, i] = alpha <v_j, g_i>        (m, c)
//   rank_one_accumulate(acc, G, V, w) acc += ((V Gᵀ) * w) G              (m, D)
//   weighted_sum(C, G, out)          out = C G                          (m, D)
//
// rank_one_accumulate is DataInf's preconditioning pass (w_i = 1/(n(λ+‖g_i‖²)))
// and LiSSA's Fisher-vector product (w_i = 1/n).  It reads each row of G from
// memory ONCE: G is walked in blocks of kR = 4 rows; for a block, pass 1 sweeps
// its rows tile by tile (kT = 512 floats) and forms the 4·m dots with all the
// queries; pass 2 sweeps the same rows again, while they are still hot in L2
// (4 rows of a LoRA block of 8×1024 are 64 KiB in bf16), and adds
// Σ_r coef[r, j] g_r to each acc row j.  A bf16 tile is converted to fp32 once
// per sweep into an L1 buffer.  Register blocking: 4 G rows × 2 query rows
// (8 vector accumulators, each loaded query element feeds 4 FMAs, each G
// element 2) in both sweeps.
//
// Threading (the pool of csrc/pool.h; see there why not OpenMP): the calling
// thread and up to threads − 1 workers claim items dynamically, so that on a
// busy machine whichever thread runs does the work and nobody waits for a
// thread that is not scheduled (issue 11).  Items hold at least kItemWork
// multiply-adds; a call with less runs on the caller alone.
//  * dots (and norms_and_dots) have disjoint outputs: items are ranges of rows,
//    up to one per block of 4 rows;
//  * rank_one_accumulate and weighted_sum accumulate into one (m, D) output:
//    the rows are cut into S stripes (S ≤ 4 per thread, ≥ 128 rows each),
//    stripe 0 adds into acc and stripe s > 0 into its own (m, D) buffer, which
//    the caller adds to acc in stripe order (as they become ready, between its
//    own stripes, and the rest after the join).  S depends on the shape and
//    the thread count, not on which thread ran which stripe: the result is
//    bitwise reproducible for a given thread count, and one thread is the
//    plain sequential pass.  Several stripes per thread let a running thread
//    take over the stripes of a preempted one; the buffers cost
//    (S − 1)·m·D·4 bytes (kept per calling thread up to 64 MiB, to spare the
//    page faults), one write and one read each: small next to the c·D·2
//    bytes of G for m ≪ c; they are capped at 1 GiB.  The alternative,
//    splitting D into per-thread tiles, would need every thread to read every
//    row (the dots need the whole row before the axpy) plus a barrier per row
//    block.  weighted_sum is pass 2 alone with coef = C.
//
// Groups (the backends' batch axis): every function also takes b same-shape
// blocks, each operand with a leading block axis (G (b, c, D), V (b, m, D),
// w (b, c), ...; each block C-contiguous, the block stride anything, so a
// view of a bigger chunk is read in place), one result per block, as ONE job
// on the pool (run_group): the items of all blocks are claimed together.
//
// When D is so large that 4 rows do not fit in L2 (D > ~64 K bf16), pass 2
// re-reads the rows from L3/DRAM.
//
// norms_and_dots (csrc/norms_dots.cpp) is pass 1 with the squared norms of the
// rows accumulated from the same L1 tiles (pyinf_norms_dots_pass).

#include "common.h"
#include "pool.h"

#include <atomic>
#include <memory>
#include <thread>
#include <vector>

// -std=c++17 turns GCC's default FP contraction off: allow a*b+c -> FMA here.
#pragma GCC optimize("fp-contract=fast")

namespace py = pybind11;
using namespace pyinf;

namespace {

constexpr int64_t kR = 4;    // G rows per block
constexpr int64_t kT = 512;  // D elements per tile

// Pointers to kR fp32 rows [k0, k0 + L) of rows i0.. of G: fp32 rows are read
// in place, bf16 rows converted into buf; rows past Rn point at zeros.
template <typename TG>
PYINF_INLINE void tile_rows(const TG* G, int64_t D, int64_t i0, int64_t Rn,
                            int64_t k0, int64_t L, float* buf,
                            const float* zeros, const float** g) {
  for (int64_t r = 0; r < kR; ++r) {
    if (r >= Rn) {
      g[r] = zeros;
      continue;
    }
    const TG* src = G + (i0 + r) * D + k0;
    if constexpr (std::is_same<TG, float>::value) {
      g[r] = src;
    } else {
      float* dst = buf + r * kT;
      int64_t k = 0;
      for (; k + 8 <= L; k += 8) store8(dst + k, load8(src + k));
      for (; k < L; ++k) dst[k] = bf16_to_float(src[k]);
      g[r] = dst;
    }
  }
}

// Pass 1 for one tile: dacc[8 (r*m + j) ..] (8-lane partial sums; plain
// floats: std::vector drops the alignment attribute of vf8) and dtail[r*m + j]
// (scalar tail) += <g_r, v_j> over the tile.
PYINF_INLINE void dots_tile(const float* const* g, const float* V, int64_t D,
                            int64_t m, int64_t k0, int64_t L, float* dacc,
                            float* dtail) {
#define LD(r, jj) load8(dacc + 8 * ((r) * m + (jj)))
#define ST(r, jj, v) store8(dacc + 8 * ((r) * m + (jj)), v)
  const int64_t L8 = L & ~int64_t(7);
  const float* __restrict g0 = g[0];
  const float* __restrict g1 = g[1];
  const float* __restrict g2 = g[2];
  const float* __restrict g3 = g[3];
  int64_t j = 0;
  for (; j + 2 <= m; j += 2) {
    const float* __restrict v0 = V + j * D + k0;
    const float* __restrict v1 = v0 + D;
    vf8 a00 = LD(0, j), a01 = LD(0, j + 1), a10 = LD(1, j), a11 = LD(1, j + 1);
    vf8 a20 = LD(2, j), a21 = LD(2, j + 1), a30 = LD(3, j), a31 = LD(3, j + 1);
    for (int64_t k = 0; k < L8; k += 8) {
      const vf8 x0 = load8(v0 + k), x1 = load8(v1 + k);
      const vf8 y0 = load8(g0 + k), y1 = load8(g1 + k);
      const vf8 y2 = load8(g2 + k), y3 = load8(g3 + k);
      a00 += y0 * x0; a01 += y0 * x1;
      a10 += y1 * x0; a11 += y1 * x1;
      a20 += y2 * x0; a21 += y2 * x1;
      a30 += y3 * x0; a31 += y3 * x1;
    }
    ST(0, j, a00); ST(0, j + 1, a01); ST(1, j, a10); ST(1, j + 1, a11);
    ST(2, j, a20); ST(2, j + 1, a21); ST(3, j, a30); ST(3, j + 1, a31);
    for (int64_t k = L8; k < L; ++k) {
      for (int64_t r = 0; r < kR; ++r) {
        dtail[r * m + j] += g[r][k] * v0[k];
        dtail[r * m + j + 1] += g[r][k] * v1[k];
      }
    }
  }
  for (; j < m; ++j) {
    const float* __restrict v0 = V + j * D + k0;
    vf8 a0 = LD(0, j), a1 = LD(1, j), a2 = LD(2, j), a3 = LD(3, j);
    for (int64_t k = 0; k < L8; k += 8) {
      const vf8 x0 = load8(v0 + k);
      a0 += load8(g0 + k) * x0;
      a1 += load8(g1 + k) * x0;
      a2 += load8(g2 + k) * x0;
      a3 += load8(g3 + k) * x0;
    }
    ST(0, j, a0); ST(1, j, a1); ST(2, j, a2); ST(3, j, a3);
    for (int64_t k = L8; k < L; ++k)
      for (int64_t r = 0; r < kR; ++r) dtail[r * m + j] += g[r][k] * v0[k];
  }
#undef LD
#undef ST
}

// ||g_r||^2 over one tile: nacc[8 r ..] (lanes), nacc[8 kR + r] (tail).
PYINF_INLINE void norms_tile(const float* const* g, int64_t L, float* nacc) {
  const int64_t L8 = L & ~int64_t(7);
  for (int64_t r = 0; r < kR; ++r) {
    const float* __restrict gr = g[r];
    vf8 a0 = load8(nacc + 8 * r), a1 = vf8{};
    int64_t k = 0;
    for (; k + 16 <= L8; k += 16) {
      const vf8 y0 = load8(gr + k), y1 = load8(gr + k + 8);
      a0 += y0 * y0;
      a1 += y1 * y1;
    }
    for (; k < L8; k += 8) {
      const vf8 y0 = load8(gr + k);
      a0 += y0 * y0;
    }
    store8(nacc + 8 * r, a0 + a1);
    for (k = L8; k < L; ++k) nacc[8 * kR + r] += gr[k] * gr[k];
  }
}

// Pass 2 for one tile: out[j, k0 + k] += Σ_r coef[r*m + j] g_r[k]; with
// kFresh, out is not read: it is taken as zeros (the first block of a stripe
// buffer; 0 + x rounds as the zero-filled buffer would: the same bits).
template <bool kFresh>
PYINF_INLINE void axpy_tile(const float* const* g, const float* coef,
                            float* out, int64_t D, int64_t m, int64_t k0,
                            int64_t L) {
  const int64_t L8 = L & ~int64_t(7);
  const float* __restrict g0 = g[0];
  const float* __restrict g1 = g[1];
  const float* __restrict g2 = g[2];
  const float* __restrict g3 = g[3];
  int64_t j = 0;
  for (; j + 2 <= m; j += 2) {
    float* __restrict o0 = out + j * D + k0;
    float* __restrict o1 = o0 + D;
    const float s00 = coef[0 * m + j], s01 = coef[0 * m + j + 1];
    const float s10 = coef[1 * m + j], s11 = coef[1 * m + j + 1];
    const float s20 = coef[2 * m + j], s21 = coef[2 * m + j + 1];
    const float s30 = coef[3 * m + j], s31 = coef[3 * m + j + 1];
    const vf8 c00 = splat8(s00), c01 = splat8(s01), c10 = splat8(s10),
              c11 = splat8(s11), c20 = splat8(s20), c21 = splat8(s21),
              c30 = splat8(s30), c31 = splat8(s31);
    for (int64_t k = 0; k < L8; k += 8) {
      const vf8 y0 = load8(g0 + k), y1 = load8(g1 + k);
      const vf8 y2 = load8(g2 + k), y3 = load8(g3 + k);
      vf8 z0 = kFresh ? vf8{} : load8(o0 + k);
      vf8 z1 = kFresh ? vf8{} : load8(o1 + k);
      z0 += c00 * y0; z1 += c01 * y0;
      z0 += c10 * y1; z1 += c11 * y1;
      z0 += c20 * y2; z1 += c21 * y2;
      z0 += c30 * y3; z1 += c31 * y3;
      store8(o0 + k, z0);
      store8(o1 + k, z1);
    }
    for (int64_t k = L8; k < L; ++k) {
      o0[k] = (kFresh ? 0.0f : o0[k]) + (s00 * g0[k] + s10 * g1[k] + s20 * g2[k] + s30 * g3[k]);
      o1[k] = (kFresh ? 0.0f : o1[k]) + (s01 * g0[k] + s11 * g1[k] + s21 * g2[k] + s31 * g3[k]);
    }
  }
  for (; j < m; ++j) {
    float* __restrict o0 = out + j * D + k0;
    const float s0 = coef[0 * m + j], s1 = coef[1 * m + j];
    const float s2 = coef[2 * m + j], s3 = coef[3 * m + j];
    const vf8 c0 = splat8(s0), c1 = splat8(s1), c2 = splat8(s2),
              c3 = splat8(s3);
    for (int64_t k = 0; k < L8; k += 8) {
      vf8 z0 = kFresh ? vf8{} : load8(o0 + k);
      z0 += c0 * load8(g0 + k);
      z0 += c1 * load8(g1 + k);
      z0 += c2 * load8(g2 + k);
      z0 += c3 * load8(g3 + k);
      store8(o0 + k, z0);
    }
    for (int64_t k = L8; k < L; ++k)
      o0[k] = (kFresh ? 0.0f : o0[k]) + (s0 * g0[k] + s1 * g1[k] + s2 * g2[k] + s3 * g3[k]);
  }
}

enum class Op { Dots, RankOne, WeightedSum };

struct Args {
  const void* G;
  int64_t c, D, m;
  const float* V;      // (m, D): Dots, RankOne
  const float* w;      // (c,): RankOne
  const float* C;      // (m, c): WeightedSum
  float* dots_out;     // (m, c): Dots
  float alpha;         // Dots
  float* norms_out;    // (c,) or nullptr: Dots also writes ||g_i||^2
};

// Rows [r0, r1) of G; `out` (m, D) is the accumulator (RankOne, WeightedSum);
// `fresh`: out holds garbage, to be taken as zeros (a stripe buffer).
template <typename TG>
PYINF_INLINE void rows_impl(Op op, const Args& a, int64_t r0, int64_t r1,
                            float* out, bool fresh) {
  const TG* G = static_cast<const TG*>(a.G);
  const int64_t D = a.D, m = a.m, c = a.c;
  alignas(64) float buf[kR * kT];
  alignas(64) float zeros[kT] = {};
  float nacc[8 * kR + kR];  // norms: 8-lane partial sums per row, then scalar tails
  const float* g[kR];
  std::vector<float> dacc(static_cast<size_t>(8 * kR * m));
  std::vector<float> dtail(static_cast<size_t>(kR * m));
  std::vector<float> coef(static_cast<size_t>(kR * m));
  for (int64_t i0 = r0; i0 < r1; i0 += kR) {
    const int64_t Rn = std::min<int64_t>(kR, r1 - i0);
    if (op != Op::WeightedSum) {
      std::fill(dacc.begin(), dacc.end(), 0.0f);
      std::fill(dtail.begin(), dtail.end(), 0.0f);
      std::fill(nacc, nacc + 8 * kR + kR, 0.0f);
      for (int64_t k0 = 0; k0 < D; k0 += kT) {
        const int64_t L = std::min<int64_t>(kT, D - k0);
        tile_rows<TG>(G, D, i0, Rn, k0, L, buf, zeros, g);
        if (a.norms_out) norms_tile(g, L, nacc);
        dots_tile(g, a.V, D, m, k0, L, dacc.data(), dtail.data());
      }
      if (a.norms_out)
        for (int64_t r = 0; r < Rn; ++r)
          a.norms_out[i0 + r] = hsum8(load8(nacc + 8 * r)) + nacc[8 * kR + r];
      for (int64_t r = 0; r < Rn; ++r) {
        for (int64_t j = 0; j < m; ++j) {
          const float d = hsum8(load8(dacc.data() + 8 * (r * m + j))) + dtail[r * m + j];
          if (op == Op::Dots)
            a.dots_out[j * c + i0 + r] = a.alpha * d;
          else
            coef[r * m + j] = d * a.w[i0 + r];
        }
      }
      if (op == Op::Dots) continue;
    } else {
      for (int64_t r = 0; r < Rn; ++r)
        for (int64_t j = 0; j < m; ++j) coef[r * m + j] = a.C[j * c + i0 + r];
    }
    for (int64_t r = Rn; r < kR; ++r)
      for (int64_t j = 0; j < m; ++j) coef[r * m + j] = 0.0f;
    for (int64_t k0 = 0; k0 < D; k0 += kT) {
      const int64_t L = std::min<int64_t>(kT, D - k0);
      tile_rows<TG>(G, D, i0, Rn, k0, L, buf, zeros, g);
      if (fresh && i0 == r0)
        axpy_tile<true>(g, coef.data(), out, D, m, k0, L);
      else
        axpy_tile<false>(g, coef.data(), out, D, m, k0, L);
    }
  }
}

PYINF_CLONES
void rows_f32(Op op, const Args& a, int64_t r0, int64_t r1, float* out,
              bool fresh) {
  rows_impl<float>(op, a, r0, r1, out, fresh);
}

PYINF_CLONES
void rows_bf16(Op op, const Args& a, int64_t r0, int64_t r1, float* out,
               bool fresh) {
  rows_impl<uint16_t>(op, a, r0, r1, out, fresh);
}

PYINF_CLONES
void add_into(float* __restrict dst, const float* __restrict src, int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) dst[k] += src[k];
}

// Work sizes (in multiply-adds; one thread does ~15-20 G/s here):
//  * a job is split into items of at least kItemWork, so that a call too small
//    to gain from a second thread (the test suite's) runs on the caller alone
//    and never waits for a wake-up;
//  * accumulating passes use at most kStripesPerThread stripes per thread:
//    enough that, on a busy machine, the caller (or any thread that runs)
//    takes over the stripes of a thread that is not running, and few enough
//    that the stripe accumulators stay small next to G; and stripes of at
//    least kMinStripeRows rows (see run()).
#ifndef PYINF_ITEM_WORK_SHIFT  // (a build-time knob for experiments)
#define PYINF_ITEM_WORK_SHIFT 22
#endif
constexpr int64_t kItemWork = int64_t(1) << PYINF_ITEM_WORK_SHIFT;
#ifndef PYINF_STRIPES_PER_THREAD
#define PYINF_STRIPES_PER_THREAD 4
#endif
constexpr int64_t kStripesPerThread = PYINF_STRIPES_PER_THREAD;
#ifndef PYINF_MIN_STRIPE_ROWS
#define PYINF_MIN_STRIPE_ROWS 128
#endif
constexpr int64_t kMinStripeRows = PYINF_MIN_STRIPE_ROWS;
constexpr int64_t kMaxPrivateBytes = int64_t(1) << 30;
// A caller's stripe accumulators are kept between calls up to this size (no
// page faults on every call of a chunked pass).
constexpr size_t kKeepScratchFloats = size_t(64) << 20 >> 2;

float* scratch(size_t n) {
  thread_local std::unique_ptr<float[]> buf;
  thread_local size_t cap = 0;
  if (n > cap) {
    buf.reset();
    buf.reset(new float[n]);
    cap = n;
  }
  return buf.get();
}

// Multiply-adds per row of G.
int64_t row_work(Op op, const Args& a) {
  return a.D * std::max<int64_t>(1, op == Op::RankOne ? 2 * a.m
                                                      : a.m + (a.norms_out ? 1 : 0));
}

// The items one block's pass is cut into: at least kItemWork each, at most
// one per block of kR rows.
int64_t max_items(Op op, const Args& a) {
  const int64_t nblocks = (a.c + kR - 1) / kR;
  return std::max<int64_t>(1, std::min<int64_t>(nblocks, a.c * row_work(op, a) / kItemWork));
}

// Stripes of an accumulating pass over one block (see run()).
int64_t stripes(const Args& a, int64_t items, int nt) {
  int64_t S = nt > 1 ? std::min<int64_t>(items, kStripesPerThread * nt) : 1;
  S = std::min<int64_t>(S, std::max<int64_t>(1, a.c / kMinStripeRows));
  return std::min<int64_t>(S, 1 + kMaxPrivateBytes / (a.m * a.D * 4));
}

// One block's pass.
void run(Op op, Kind kind, const Args& a, float* out) {
  auto rows = kind == Kind::F32 ? rows_f32 : rows_bf16;
  const int64_t c = a.c, nblocks = (c + kR - 1) / kR;
  const int nt = effective_threads();
  const int64_t items = max_items(op, a);

  if (op == Op::Dots) {
    // Disjoint outputs: items of `step` rows, claimed in any order.
    const int64_t n_items = nt > 1 ? items : 1;
    const int64_t step = kR * ((nblocks + n_items - 1) / n_items);
    const int64_t n = (c + step - 1) / step;
    auto item = [&](int64_t s) {
      const int64_t r0 = s * step;
      rows(op, a, r0, std::min(c, r0 + step), nullptr, false);
    };
    parallel_for(n, nt, item);
    return;
  }

  // Accumulating into out (m, D): S stripes of contiguous rows; stripe 0 adds
  // into out, stripe s > 0 into its own (m, D) buffer (its first row block
  // stores instead of adding: no zero fill), and the buffers are added to out
  // in stripe order: out = ((out + stripe 0) + buf 1) + buf 2 ...  S depends
  // on the shape and the thread count only, never on which thread ran what:
  // bitwise reproducible for a given thread count (one thread: the plain
  // sequential pass).  The caller folds the buffers that are ready after each
  // of its stripes, so the reduction overlaps the workers' stripes (the
  // workers never fold: the caller never waits for a preempted folder), and
  // folds the rest after the join.  Folding a buffer moves ~3·m·D·4 bytes
  // through L2/L3, ~2.4 / rows of the time of a stripe of `rows` rows (2·m·D
  // multiply-adds a row): stripes have at least kMinStripeRows rows (~2 %).
  const int64_t acc_n = a.m * a.D;
  const int64_t S = stripes(a, items, nt);
  if (S <= 1) {
    rows(op, a, 0, c, out, false);
    return;
  }
  const size_t priv_n = static_cast<size_t>((S - 1) * acc_n);
  std::unique_ptr<float[]> own;
  float* priv;
  if (priv_n <= kKeepScratchFloats) {
    priv = scratch(priv_n);
  } else {
    own.reset(new float[priv_n]);
    priv = own.get();
  }
  std::unique_ptr<std::atomic<bool>[]> finished(new std::atomic<bool>[S]);
  for (int64_t s = 0; s < S; ++s) finished[s].store(false, std::memory_order_relaxed);
  const std::thread::id caller = std::this_thread::get_id();
  int64_t folded = 1;  // the next buffer to add to out; the caller's only
  auto fold_ready = [&] {
    if (!finished[0].load(std::memory_order_acquire)) return;
    for (; folded < S && finished[folded].load(std::memory_order_acquire); ++folded)
      add_into(out, priv + (folded - 1) * acc_n, acc_n);
  };
  auto stripe = [&](int64_t s) {
    const int64_t r0 = nblocks * s / S * kR;
    const int64_t r1 = std::min(c, nblocks * (s + 1) / S * kR);
    rows(op, a, r0, r1, s == 0 ? out : priv + (s - 1) * acc_n, s > 0);
    finished[s].store(true, std::memory_order_release);
    if (std::this_thread::get_id() == caller) fold_ready();
  };
  parallel_for(S, nt, stripe);
  fold_ready();  // everything has finished
}

// A group of b blocks of the same shape: block k's operands are block 0's
// (`a`, `out`) advanced by k block strides (in elements; G's in bytes).
struct Job {
  Args a;
  float* out;  // RankOne, WeightedSum: block 0's (m, D) accumulator
  int64_t b;
  int64_t sG, sV, sW, sC, sDots, sNorms, sOut;

  Args block(int64_t k) const {
    Args x = a;
    x.G = static_cast<const char*>(a.G) + k * sG;
    if (x.V) x.V += k * sV;
    if (x.w) x.w += k * sW;
    if (x.C) x.C += k * sC;
    if (x.dots_out) x.dots_out += k * sDots;
    if (x.norms_out) x.norms_out += k * sNorms;
    return x;
  }
  float* out_of(int64_t k) const { return out ? out + k * sOut : nullptr; }
};

// A group's pass on the pool, as ONE job (one wake-up, one join), not b:
//  * dots: items are ranges of the b · ⌈c/kR⌉ row blocks of the group, sized
//    as in run() by the work of the whole group (at least kItemWork each);
//  * accumulating passes write one output per block: items are ranges of
//    whole blocks, each block the plain sequential pass (no stripes, no
//    buffers); but when a block is big enough for stripes and the group has
//    fewer blocks than threads, the blocks run one after the other, each
//    striped by run().
// Which of these runs depends on the shape and the thread count only: the
// results are bitwise reproducible for a given thread count, as in run().
// WeightedSum's outputs are not zero-filled beforehand: a block run by run()
// is filled just before it, a block run by rows() takes its output as zeros
// (`fresh`), so that each block's output is written while it is hot in cache.
void run_group(Op op, Kind kind, const Job& j) {
  const int64_t mD = j.a.m * j.a.D;
  auto run_block = [&](int64_t k) {
    if (op == Op::WeightedSum) std::fill(j.out_of(k), j.out_of(k) + mD, 0.0f);
    run(op, kind, j.block(k), j.out_of(k));
  };
  if (j.b == 1) {
    run_block(0);
    return;
  }
  auto rows = kind == Kind::F32 ? rows_f32 : rows_bf16;
  const int64_t c = j.a.c, nblocks = (c + kR - 1) / kR;
  const int nt = effective_threads();
  const int64_t work = j.b * c * row_work(op, j.a);
  if (op == Op::Dots) {
    const int64_t N = j.b * nblocks;
    const int64_t n = nt > 1 ? std::max<int64_t>(1, std::min<int64_t>(N, work / kItemWork)) : 1;
    auto item = [&](int64_t s) {
      const int64_t hi = N * (s + 1) / n;
      for (int64_t f = N * s / n; f < hi;) {
        const int64_t k = f / nblocks, e = std::min(hi, (k + 1) * nblocks);
        rows(op, j.block(k), (f - k * nblocks) * kR, std::min(c, (e - k * nblocks) * kR), nullptr, false);
        f = e;
      }
    };
    parallel_for(n, nt, item);
    return;
  }
  if (j.b < nt && stripes(j.a, max_items(op, j.a), nt) > 1) {
    for (int64_t k = 0; k < j.b; ++k) run_block(k);
    return;
  }
  const int64_t n = nt > 1 ? std::max<int64_t>(1, std::min<int64_t>(j.b, work / kItemWork)) : 1;
  auto item = [&](int64_t s) {
    for (int64_t k = j.b * s / n; k < j.b * (s + 1) / n; ++k)
      rows(op, j.block(k), 0, c, j.out_of(k), op == Op::WeightedSum);
  };
  parallel_for(n, nt, item);
}

// G, one block (c, D) or a group (b, c, D): float32 or bf16 bits.
struct GradGroup {
  py::buffer_info info;
  Group g;
  Kind kind;
};

GradGroup grad_group(const py::buffer& obj) {
  py::buffer_info info = request(obj, "G", false);
  const Kind kind = grad_kind(info, "G", -1);
  const Group g = group_of(info, "G", 2, false);
  return {std::move(info), g, kind};
}

void dots_py(const py::buffer& G_obj, const py::buffer& V_obj,
             const py::buffer& out_obj, float alpha) {
  const GradGroup G = grad_group(G_obj);
  py::buffer_info V = request(V_obj, "V", false);
  py::buffer_info O = request(out_obj, "out", true);
  const Group gv = f32_group(V, "V", 2, false), go = f32_group(O, "out", 2, true);
  const int64_t b = G.g.b, c = G.g.rows, D = G.g.cols, m = gv.rows;
  expect_group(G.g, gv, V, "V", m, D, "(m, D of G)");
  expect_group(G.g, go, O, "out", m, c, "(V rows, G rows)");
  if (c == 0 || m == 0 || b == 0) return;
  Job j{{G.info.ptr, c, D, m, static_cast<const float*>(V.ptr), nullptr, nullptr,
         static_cast<float*>(O.ptr), alpha, nullptr},
        nullptr, b, G.g.stride * G.info.itemsize, gv.stride, 0, 0, go.stride, 0, 0};
  py::gil_scoped_release nogil;
  if (D == 0) {
    for (int64_t k = 0; k < b; ++k) std::fill(j.block(k).dots_out, j.block(k).dots_out + m * c, 0.0f);
    return;
  }
  run_group(Op::Dots, G.kind, j);
}

void rank_one_py(const py::buffer& acc_obj, const py::buffer& G_obj,
                 const py::buffer& V_obj, const py::buffer& w_obj) {
  const GradGroup G = grad_group(G_obj);
  py::buffer_info A = request(acc_obj, "acc", true);
  py::buffer_info V = request(V_obj, "V", false);
  py::buffer_info W = request(w_obj, "w", false);
  const Group ga = f32_group(A, "acc", 2, true), gv = f32_group(V, "V", 2, false),
              gw = f32_group(W, "w", 1, false);
  const int64_t b = G.g.b, c = G.g.rows, D = G.g.cols, m = gv.rows;
  expect_group(G.g, gv, V, "V", m, D, "(m, D of G)");
  expect_group(G.g, ga, A, "acc", m, D, "(V rows, D of G)");
  expect_group(G.g, gw, W, "w", 1, c, "(G rows,)");
  if (c == 0 || m == 0 || D == 0 || b == 0) return;
  Job j{{G.info.ptr, c, D, m, static_cast<const float*>(V.ptr),
         static_cast<const float*>(W.ptr), nullptr, nullptr, 1.0f, nullptr},
        static_cast<float*>(A.ptr), b, G.g.stride * G.info.itemsize, gv.stride, gw.stride, 0, 0, 0, ga.stride};
  py::gil_scoped_release nogil;
  run_group(Op::RankOne, G.kind, j);
}

void weighted_sum_py(const py::buffer& C_obj, const py::buffer& G_obj,
                     const py::buffer& out_obj) {
  const GradGroup G = grad_group(G_obj);
  py::buffer_info Cb = request(C_obj, "C", false);
  py::buffer_info O = request(out_obj, "out", true);
  const Group gc = f32_group(Cb, "C", 2, false), go = f32_group(O, "out", 2, true);
  const int64_t b = G.g.b, c = G.g.rows, D = G.g.cols, m = gc.rows;
  expect_group(G.g, gc, Cb, "C", m, c, "(m, G rows)");
  expect_group(G.g, go, O, "out", m, D, "(C rows, D of G)");
  Job j{{G.info.ptr, c, D, m, nullptr, nullptr, static_cast<const float*>(Cb.ptr),
         nullptr, 1.0f, nullptr},
        static_cast<float*>(O.ptr), b, G.g.stride * G.info.itemsize, 0, 0, gc.stride, 0, 0, go.stride};
  py::gil_scoped_release nogil;
  if (c == 0 || m == 0 || D == 0) {
    for (int64_t k = 0; k < b; ++k) std::fill(j.out_of(k), j.out_of(k) + m * D, 0.0f);
    return;
  }
  run_group(Op::WeightedSum, G.kind, j);  // fills out
}

}  // namespace

void pyinf_norms_dots_pass(bool bf16, const void* G, int64_t sG, int64_t b,
                           int64_t c, int64_t D, const float* V, int64_t sV,
                           int64_t m, float* norms, int64_t sN, float* dots,
                           int64_t sD) {
  const Job j{{G, c, D, m, V, nullptr, nullptr, dots, 1.0f, norms},
              nullptr, b, sG * (bf16 ? 2 : 4), sV, 0, 0, sD, sN, 0};
  run_group(Op::Dots, bf16 ? Kind::BF16 : Kind::F32, j);
}

void pyinf_register_passes(py::module_& mod) {
  mod.def("dots", &dots_py, py::arg("G"), py::arg("V"), py::arg("out"),
          py::arg("alpha") = 1.0f,
          "dots(G, V, out, alpha=1.0) -> None\n\n"
          "out[j, i] = alpha * <V[j], G[i]>, one read of G (c, D).  G: float32 or\n"
          "uint16/int16 bf16 bits; V float32 (m, D); out float32 (m, c).");
  mod.def("rank_one_accumulate", &rank_one_py, py::arg("acc"), py::arg("G"),
          py::arg("V"), py::arg("w"),
          "rank_one_accumulate(acc, G, V, w) -> None\n\n"
          "In place acc (m, D) += ((V G^T) * w) G, reading each row of G (c, D)\n"
          "from memory once.  G: float32 or uint16/int16 bf16 bits; V float32\n"
          "(m, D); w float32 (c,); acc float32 (m, D).");
  mod.def("weighted_sum", &weighted_sum_py, py::arg("C"), py::arg("G"),
          py::arg("out"),
          "weighted_sum(C, G, out) -> None\n\n"
          "out (m, D) = C (m, c) @ G (c, D), one read of G.  G: float32 or\n"
          "uint16/int16 bf16 bits; C and out float32 (out is overwritten).");
  // (each function also takes a group of b blocks: see the header comment)
}
