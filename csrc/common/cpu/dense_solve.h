// The dense fixed-point solve on the CPU, shared by Picard (fixed_point_dense/fixed_point_dense_cpu.cpp) and
// Anderson (fixed_point_dense_anderson/fixed_point_dense_anderson_cpu.cpp), forward and adjoint.
//
// Batch rows are split once between threads (at::parallel_for); each thread runs the whole solve for its rows with
// no synchronisation at all. Per iteration it multiplies its still active rows by the packed iteration matrix with
// the register-blocked micro-kernel (dense_kernels.h), then hands them to the method, which computes T(x), the
// residuals and the next iterate; the per-sample contract (stop_rule.h) decides which rows go on. Stopped rows leave
// the active list, so converged samples cost nothing. Everything is compiled for AVX-512, AVX2+FMA and the baseline
// ISA and picked at run time. A method is a struct with
//   static at::Tensor allocate(ARGS&)           its own scratch (pointers set into ARGS; the tensor is kept alive)
//   static constexpr int64_t kRowsPerBlock      a thread solves its rows in blocks of this many, each to the end
//   template <TILE> static void iterate(const ARGS&, const int64_t* active, int64_t n_active, int64_t k)
//                                               after y = x @ packed: write residual[row] and the next x of every
//                                               active row (evaluation k, 1-based)
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

#include "common/cpu/dense_kernels.h"
#include "common/cpu/simd.h"
#include "common/params.h"
#include "common/params_from_tensors.h"
#include "common/stop_rule.h"

namespace deqkern {
namespace cpu {

constexpr int kMaxRowInputs = 3;  // forward: c, z0; adjoint: grad_z, z, c

// A method's parameters (PicardParams or AndersonParams) plus the CPU solve's scratch. Scratch matrices are
// row-major with leading dimension ld >= d (rows zero-padded to kRowAlignBytes).
template <typename PARAMS>
struct CpuDenseArgs : PARAMS {
  using T = typename PARAMS::Scalar;
  const T* packed = nullptr;  // (d, ld): y = x @ packed, i.e. W^T (forward) or W (adjoint)
  const T* x0 = nullptr;      // (batch, d) the start, or null for zeros
  const T* bias = nullptr;    // (batch, d): c (forward) or grad_z (adjoint)
  const T* scale = nullptr;   // (batch, d): s = act'(z W^T + c), adjoint only
  T* x = nullptr;             // (batch, ld) the iterate
  T* y = nullptr;             // (batch, ld) x @ packed, then T(x)
  int64_t* active = nullptr;  // (batch,) list of active rows, per thread range
  const T* inputs[kMaxRowInputs] = {};  // (batch, d) each: a row is solved only if its rows of these are finite
  int n_inputs = 0;
  bool matrix_finite = true;
  int64_t ld = 0, row_begin = 0, row_end = 0;
};

template <typename T>
inline int64_t padded_width(int64_t d) {
  constexpr int64_t per_align = kRowAlignBytes / sizeof(T);
  return (d + per_align - 1) / per_align * per_align;
}

// y[row] <- T(x[row]) from y[row] = x[row] @ packed: act(y + c) forward, s * (y + grad_z) adjoint.
template <typename ARGS>
DEQKERN_ALWAYS_INLINE void apply_map(const ARGS& a, int64_t row) {
  using T = typename ARGS::T;
  T* t = a.y + row * a.ld;
  const T* bias = a.bias + row * a.d;
  if (a.adjoint) {
    const T* s = a.scale + row * a.d;
    for (int64_t i = 0; i < a.d; ++i) t[i] = s[i] * (t[i] + bias[i]);
  } else {
    apply_activation(a.activation, t, bias, a.d);
  }
}

template <typename TILE, typename METHOD, typename ARGS>
DEQKERN_ALWAYS_INLINE void solve_rows(const ARGS& a) {
  using T = typename ARGS::T;
  int64_t* active = a.active + a.row_begin;
  int64_t n_active = 0;
  for (int64_t row = a.row_begin; row < a.row_end; ++row) {
    T* x = a.x + row * a.ld;
    if (a.x0 != nullptr) {
      std::memcpy(x, a.x0 + row * a.d, a.d * sizeof(T));
      std::memset(x + a.d, 0, (a.ld - a.d) * sizeof(T));
    } else {
      std::memset(x, 0, a.ld * sizeof(T));
    }
    bool valid = a.matrix_finite;
    for (int j = 0; j < a.n_inputs && valid; ++j) valid = all_finite(a.inputs[j] + row * a.d, a.d);
    a.iterations[row] = 0;
    a.residual[row] = not_iterated_residual<T>();
    if (valid) active[n_active++] = row;
  }
  for (int64_t k = 1; k <= a.max_iter && n_active > 0; ++k) {
    multiply_active_rows<T, TILE>(a, active, n_active);
    METHOD::template iterate<TILE>(a, active, n_active, k);
    int64_t still_active = 0;
    for (int64_t i = 0; i < n_active; ++i) {
      const int64_t row = active[i];
      a.iterations[row] = static_cast<int32_t>(k);
      if (keeps_iterating(a.residual[row], a.tol)) active[still_active++] = row;
    }
    n_active = still_active;
  }
  for (int64_t row = a.row_begin; row < a.row_end; ++row) {
    if (a.penalty_row_norms != nullptr) {  // out holds the penalty's term (adjoint_scale_rows)
      for (int64_t i = 0; i < a.d; ++i) a.out[row * a.d + i] += a.x[row * a.ld + i];
    } else {
      std::memcpy(a.out + row * a.d, a.x + row * a.ld, a.d * sizeof(T));
    }
    a.converged[row] = is_converged(a.residual[row], a.tol);
  }
}

// The adjoint's s = act'(z W^T + c) for rows [row_begin, row_end), with the solve's own micro-kernel on W^T packed in
// `packed_forward`: each row's products are the same however the rows are split between threads (a BLAS call's
// are not), so the backward's result does not depend on the thread count. x and y are the solve's scratch, free
// until the solve starts.
template <typename TILE, typename ARGS>
DEQKERN_ALWAYS_INLINE void adjoint_scale_rows(const ARGS& solve_args, const typename ARGS::T* packed_forward,
                                              typename ARGS::T* scale) {
  using T = typename ARGS::T;
  ARGS a = solve_args;
  a.packed = packed_forward;
  int64_t* rows = a.active + a.row_begin;
  int64_t n_rows = 0;
  for (int64_t row = a.row_begin; row < a.row_end; ++row) {
    T* x = a.x + row * a.ld;
    std::memcpy(x, a.z + row * a.d, a.d * sizeof(T));
    std::memset(x + a.d, 0, (a.ld - a.d) * sizeof(T));
    rows[n_rows++] = row;
  }
  multiply_active_rows<T, TILE>(a, rows, n_rows);
  if (a.penalty_row_norms == nullptr) {
    for (int64_t row = a.row_begin; row < a.row_end; ++row)
      for (int64_t i = 0; i < a.d; ++i)
        scale[row * a.d + i] = activation_derivative(a.activation, a.y[row * a.ld + i] + a.c[row * a.d + i]);
    return;
  }
  // With the Jacobian penalty, out starts as its gradient's term; the solve adds its result (solve_rows).
  for (int64_t row = a.row_begin; row < a.row_end; ++row) {
    for (int64_t i = 0; i < a.d; ++i) {
      T second;
      const T s = activation_derivatives(a.activation, a.y[row * a.ld + i] + a.c[row * a.d + i], second);
      scale[row * a.d + i] = s;
      a.out[row * a.d + i] = a.penalty_scale * s * second * a.penalty_row_norms[i];
    }
  }
}

// The Jacobian penalty's row term and value from s = act'(u) (batch, d) and the row norms, in one pass in batch
// order (the same sums however many threads computed s), summed in double: a float32 running sum over a large batch
// would drift.
template <typename T>
void finish_penalty_cpu(const T* s, const T* row_norms, DenseSolveTensors& t) {
  const int64_t batch = t.batch(), d = t.d();
  std::vector<double> column(d, 0.0);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t i = 0; i < d; ++i) column[i] += double(s[b * d + i]) * double(s[b * d + i]);
  double value = 0.0;
  for (int64_t i = 0; i < d; ++i) value += column[i] * double(row_norms[i]);
  *t.penalty.mutable_data_ptr<T>() = static_cast<T>(value / t.penalty_count());
  T* rows = t.penalty_rows.mutable_data_ptr<T>();
  for (int64_t i = 0; i < d; ++i) rows[i] = static_cast<T>(column[i] * t.penalty_scale());
}

#ifdef DEQKERN_X86_DISPATCH
template <typename ARGS>
DEQKERN_TARGET_AVX512 void adjoint_scale_avx512(const ARGS& a, const typename ARGS::T* p, typename ARGS::T* s) {
  adjoint_scale_rows<TileAvx512>(a, p, s);
}
template <typename ARGS>
DEQKERN_TARGET_AVX2 void adjoint_scale_avx2(const ARGS& a, const typename ARGS::T* p, typename ARGS::T* s) {
  adjoint_scale_rows<TileAvx2>(a, p, s);
}
#endif

template <typename ARGS>
void adjoint_scale_dispatch(const ARGS& a, const typename ARGS::T* packed_forward, typename ARGS::T* scale) {
#ifdef DEQKERN_X86_DISPATCH
  const int isa = cpu_isa();
  if (isa == 2) return adjoint_scale_avx512(a, packed_forward, scale);
  if (isa == 1) return adjoint_scale_avx2(a, packed_forward, scale);
#endif
  adjoint_scale_rows<TileBaseline>(a, packed_forward, scale);
}

#ifdef DEQKERN_X86_DISPATCH
template <typename METHOD, typename ARGS>
DEQKERN_TARGET_AVX512 void solve_rows_avx512(const ARGS& a) { solve_rows<TileAvx512, METHOD>(a); }
template <typename METHOD, typename ARGS>
DEQKERN_TARGET_AVX2 void solve_rows_avx2(const ARGS& a) { solve_rows<TileAvx2, METHOD>(a); }
#endif

template <typename METHOD, typename ARGS>
void solve_rows_dispatch(const ARGS& a) {
#ifdef DEQKERN_X86_DISPATCH
  const int isa = cpu_isa();
  if (isa == 2) return solve_rows_avx512<METHOD>(a);
  if (isa == 1) return solve_rows_avx2<METHOD>(a);
#endif
  solve_rows<TileBaseline, METHOD>(a);
}

// One dense solve. `args` has been filled from `t` (DenseSolveTensors::fill) and carries the method's options.
// Row ranges of the batch, one per thread task: enough rows per thread to fill micro-tiles; each range is then an
// independent solve.
template <typename FN>
void for_row_ranges(int64_t batch, FN&& fn) {
  const int64_t threads = std::max(1, at::get_num_threads());
  const int64_t grain = std::max<int64_t>(4, (batch + threads - 1) / threads);
  at::parallel_for(0, batch, grain, fn);
}

// The outputs are t's (its penalty ones too, with a penalty).
template <typename METHOD, typename ARGS>
void run_dense_solve(ARGS args, DenseSolveTensors& t) {
  using T = typename ARGS::T;
  const int64_t batch = t.batch(), d = t.d();
  const auto options = t.c.options();
  const int64_t ld = padded_width<T>(d);
  int64_t bytes = 0;  // the shared scratch in one allocation, before the first iteration
  const int64_t packed_at = carve(bytes, d * ld * sizeof(T));
  const int64_t packed_forward_at = carve(bytes, args.adjoint ? d * ld * sizeof(T) : 0);
  const int64_t row_norms_at = carve(bytes, t.penalised() ? d * sizeof(T) : 0);
  const int64_t x_at = carve(bytes, batch * ld * sizeof(T));
  const int64_t y_at = carve(bytes, batch * ld * sizeof(T));
  const int64_t active_at = carve(bytes, batch * sizeof(int64_t));
  at::Tensor scratch = at::empty({bytes}, options.dtype(at::kByte));
  char* base = static_cast<char*>(scratch.data_ptr());
  T* packed = reinterpret_cast<T*>(base + packed_at);
  // y = x @ packed: the forward multiplies by W^T, the adjoint by W.
  const at::Tensor matrix = args.adjoint ? t.W : t.W.t();
  args.matrix_finite = pack_matrix(matrix.const_data_ptr<T>(), matrix.stride(0), matrix.stride(1), d, ld, packed);
  args.packed = packed;
  args.x0 = args.adjoint ? nullptr : args.z;
  args.bias = args.adjoint ? args.grad_z : args.c;
  args.x = reinterpret_cast<T*>(base + x_at);
  args.y = reinterpret_cast<T*>(base + y_at);
  args.active = reinterpret_cast<int64_t*>(base + active_at);
  args.n_inputs = 0;
  if (args.adjoint) args.inputs[args.n_inputs++] = args.grad_z;
  args.inputs[args.n_inputs++] = args.z;
  args.inputs[args.n_inputs++] = args.c;
  args.ld = ld;
  at::Tensor scale;
  if (args.adjoint) {  // s = act'(z W^T + c), once per solve, with W^T packed as the forward packs it
    T* packed_forward = reinterpret_cast<T*>(base + packed_forward_at);
    const at::Tensor W_t = t.W.t();
    pack_matrix(W_t.const_data_ptr<T>(), W_t.stride(0), W_t.stride(1), d, ld, packed_forward);
    scale = at::empty({batch, d}, options);
    T* s = scale.mutable_data_ptr<T>();
    T* row_norms = reinterpret_cast<T*>(base + row_norms_at);
    if (t.penalised()) {
      const T* W = t.W.const_data_ptr<T>();
      for (int64_t i = 0; i < d; ++i) {
        double sum = 0.0;  // as finish_penalty_cpu's sums
        for (int64_t k = 0; k < d; ++k) sum += double(W[i * d + k]) * double(W[i * d + k]);
        row_norms[i] = static_cast<T>(sum);
      }
      args.penalty_row_norms = row_norms;
    }
    for_row_ranges(batch, [&](int64_t begin, int64_t end) {
      ARGS chunk = args;
      chunk.row_begin = begin;
      chunk.row_end = end;
      adjoint_scale_dispatch(chunk, packed_forward, s);
    });
    args.scale = s;
    if (t.penalised()) finish_penalty_cpu(s, row_norms, t);
  }
  const at::Tensor method_scratch = METHOD::allocate(args);
  for_row_ranges(batch, [&](int64_t begin, int64_t end) {
    ARGS chunk = args;
    const int64_t block = METHOD::kRowsPerBlock > 0 ? METHOD::kRowsPerBlock : end - begin;
    for (int64_t b0 = begin; b0 < end; b0 += block) {
      chunk.row_begin = b0;
      chunk.row_end = std::min(end, b0 + block);
      solve_rows_dispatch<METHOD>(chunk);
    }
  });
}

}  // namespace cpu
}  // namespace deqkern
