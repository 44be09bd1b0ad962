// CPU kernel of power_iteration (schema: power_iteration.cpp, semantics: deqkern/reference/power_iteration.py):
// the whole iteration of every sample in one call.
//
// Samples are split between threads once (at::parallel_for); a thread then runs the complete iteration of
// each of its samples with no synchronisation. One iteration is ONE pass over the rows of W, four rows at a
// time while they are in L1: the four dot products d_i = W_i . v, then z += sum_i c_i W_i with
//   gram:      y_i = s_i d_i (J v), c_i = s_i y_i            -> z = J^T J v,  value^2 = sum_i y_i^2
//   symmetric: y_i = s_i d_i (J v), c_i = s_i v_i            -> z = J^T v,    value = sum_i v_i y_i
// (symmetric then forms z <- (J v + z) / 2 + shift v). Loops use GCC vector extensions compiled for AVX-512,
// AVX2+FMA and the baseline ISA and picked at run time (common/cpu/simd.h). All buffers exist before the first
// iteration.
// With fewer samples than threads (a single ||W||_2), the rows of W are split between the threads instead, so
// that each streams only its share of W from its own cache; they meet at one barrier per iteration.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "common/checks.h"
#include "common/cpu/simd.h"
#include "common/params.h"
#include "common/params_from_tensors.h"

namespace deqkern {
namespace {

using cpu::VecOf;

// One 64-byte vector on every instruction set (two ymm or four xmm registers below AVX-512): W's padding and the
// order of every sum are the same on any CPU (results differ only where AVX2 and AVX-512 fuse a multiply-add).
constexpr int kVecBytes = 64;
template <typename T>
constexpr int64_t kLanes = kVecBytes / sizeof(T);

constexpr int kRowBlock = 4;  // rows of W per pass step: four independent dot products, one fused axpy
constexpr int64_t kSplitRowsMinElements = 16384;  // 64 KB of float32: beyond one core's L1

// The op's parameters with W replaced by its zero-padded copy: rows are padded to `ld` (a multiple of kLanes) with
// zeros in W, v and z, so every loop runs whole vectors.
template <typename T>
struct PowerArgs : PowerIterationParams<T> {
  T* v = nullptr;   // (batch, ld) the iterate: u0 on entry, the last unit vector on exit
  T* z = nullptr;   // (batch, ld) scratch: the product
  T* jv = nullptr;  // (batch, m) scratch: J v (symmetric only)
  int64_t ld = 0;
};

// out[r] = W_r . v for the R rows starting at w.
template <typename T, int R>
DEQKERN_ALWAYS_INLINE void row_dots(const T* w, int64_t ld, const T* v, T (&out)[R]) {
  using V = typename VecOf<T, kVecBytes>::type;
  V acc[R];
  for (int r = 0; r < R; ++r) acc[r] = V{};
  for (int64_t j = 0; j < ld; j += kLanes<T>) {
    const V x = *reinterpret_cast<const V*>(v + j);
    for (int r = 0; r < R; ++r) acc[r] += *reinterpret_cast<const V*>(w + r * ld + j) * x;
  }
  for (int r = 0; r < R; ++r) out[r] = cpu::horizontal_sum<T, kVecBytes>(acc[r]);
}

// z += sum_r c[r] W_r for the same R rows (still in L1 from row_dots).
template <typename T, int R>
DEQKERN_ALWAYS_INLINE void rows_axpy(const T* w, int64_t ld, const T (&c)[R], T* z) {
  using V = typename VecOf<T, kVecBytes>::type;
  for (int64_t j = 0; j < ld; j += kLanes<T>) {
    V a = *reinterpret_cast<const V*>(z + j);
    for (int r = 0; r < R; ++r) a += c[r] * *reinterpret_cast<const V*>(w + r * ld + j);
    *reinterpret_cast<V*>(z + j) = a;
  }
}

// Rows [i, i + R) of the one pass; returns their share of the value sum.
template <typename T, int R>
DEQKERN_ALWAYS_INLINE T pass_rows(const PowerArgs<T>& a, int64_t i, const T* s, const T* v, T* z, T* jv) {
  const T* w = a.W + i * a.ld;
  T d[R], c[R];
  row_dots<T, R>(w, a.ld, v, d);
  T sum = 0;
  for (int r = 0; r < R; ++r) {
    const T si = s ? s[i + r] : T(1);
    const T y = si * d[r];
    if (!a.symmetric) {
      sum += y * y;
      c[r] = si * y;
    } else {
      jv[i + r] = y;
      sum += v[i + r] * y;
      c[r] = si * v[i + r];
    }
  }
  rows_axpy<T, R>(w, a.ld, c, z);
  return sum;
}

template <typename T>
DEQKERN_ALWAYS_INLINE T squared_norm(const T* x, int64_t ld) {
  using V = typename VecOf<T, kVecBytes>::type;
  V acc = V{};
  for (int64_t j = 0; j < ld; j += kLanes<T>) {
    const V xj = *reinterpret_cast<const V*>(x + j);
    acc += xj * xj;
  }
  return cpu::horizontal_sum<T, kVecBytes>(acc);
}

// out <- x / ||x|| when ||x|| > 0; a zero or NaN norm leaves out as it is (no 0 / 0).
template <typename T>
DEQKERN_ALWAYS_INLINE void normalise_into(const T* x, T* out, int64_t ld) {
  using V = typename VecOf<T, kVecBytes>::type;
  const T norm = std::sqrt(squared_norm(x, ld));
  if (!(norm > T(0))) return;  // out keeps its previous value
  const T inv = T(1) / norm;
  for (int64_t j = 0; j < ld; j += kLanes<T>)
    *reinterpret_cast<V*>(out + j) = *reinterpret_cast<const V*>(x + j) * inv;
}

// z = 0 over the padded row.
template <typename T>
DEQKERN_ALWAYS_INLINE void zero_row(T* z, int64_t ld) {
  using V = typename VecOf<T, kVecBytes>::type;
  for (int64_t j = 0; j < ld; j += kLanes<T>) *reinterpret_cast<V*>(z + j) = V{};
}

template <typename T>
DEQKERN_ALWAYS_INLINE void solve_sample(const PowerArgs<T>& a, int64_t b) {
  T* v = a.v + b * a.ld;
  T* z = a.z + b * a.ld;
  T* jv = a.jv ? a.jv + b * a.m : nullptr;
  const T* s = a.row_scale ? a.row_scale + b * a.m : nullptr;
  normalise_into(v, v, a.ld);
  T previous = std::numeric_limits<T>::quiet_NaN();
  T value = 0;
  int32_t k_done = 0;
  bool converged = false;
  for (int64_t k = 1; k <= a.max_iter; ++k) {
    zero_row(z, a.ld);
    T sum = 0;
    int64_t i = 0;
    for (; i + kRowBlock <= a.m; i += kRowBlock) sum += pass_rows<T, kRowBlock>(a, i, s, v, z, jv);
    for (; i < a.m; ++i) sum += pass_rows<T, 1>(a, i, s, v, z, jv);
    if (!a.symmetric) {
      value = std::sqrt(sum);
    } else {
      value = sum;
      for (int64_t j = 0; j < a.n; ++j) z[j] = T(0.5) * (jv[j] + z[j]) + a.shift * v[j];
    }
    normalise_into(z, v, a.ld);
    k_done = static_cast<int32_t>(k);
    converged = std::abs(value - previous) <= a.tol * std::abs(value);  // false at k = 1: previous is NaN
    if (converged || !std::isfinite(value)) break;
    previous = value;
  }
  a.value[b] = value;
  a.iterations[b] = k_done;
  a.converged[b] = converged;
}

template <typename T>
DEQKERN_ALWAYS_INLINE void solve_samples(const PowerArgs<T>& a, int64_t begin, int64_t end) {
  for (int64_t b = begin; b < end; ++b) solve_sample(a, b);
}

#ifdef DEQKERN_X86_DISPATCH
template <typename T>
DEQKERN_TARGET_AVX512 void solve_samples_avx512(const PowerArgs<T>& a, int64_t begin, int64_t end) {
  solve_samples(a, begin, end);
}
template <typename T>
DEQKERN_TARGET_AVX2 void solve_samples_avx2(const PowerArgs<T>& a, int64_t begin, int64_t end) {
  solve_samples(a, begin, end);
}
#endif

template <typename T>
void solve_samples_dispatch(const PowerArgs<T>& a, int64_t begin, int64_t end) {
#ifdef DEQKERN_X86_DISPATCH
  const int isa = cpu::cpu_isa();
  if (isa == 2) return solve_samples_avx512(a, begin, end);
  if (isa == 1) return solve_samples_avx2(a, begin, end);
#endif
  solve_samples(a, begin, end);
}

// z = the pass over rows [r0, r1) only (zeroed first); returns their share of the value sum.
template <typename T>
DEQKERN_ALWAYS_INLINE T pass_range(const PowerArgs<T>& a, int64_t r0, int64_t r1, const T* s, const T* v, T* z,
                                   T* jv) {
  zero_row(z, a.ld);
  T sum = 0;
  int64_t i = r0;
  for (; i + kRowBlock <= r1; i += kRowBlock) sum += pass_rows<T, kRowBlock>(a, i, s, v, z, jv);
  for (; i < r1; ++i) sum += pass_rows<T, 1>(a, i, s, v, z, jv);
  return sum;
}

#ifdef DEQKERN_X86_DISPATCH
template <typename T>
DEQKERN_TARGET_AVX512 T pass_range_avx512(const PowerArgs<T>& a, int64_t r0, int64_t r1, const T* s, const T* v, T* z,
                                          T* jv) {
  return pass_range(a, r0, r1, s, v, z, jv);
}
template <typename T>
DEQKERN_TARGET_AVX2 T pass_range_avx2(const PowerArgs<T>& a, int64_t r0, int64_t r1, const T* s, const T* v, T* z,
                                      T* jv) {
  return pass_range(a, r0, r1, s, v, z, jv);
}
#endif

// Only the pass is compiled per instruction set: the merge of the threads' slots and the normalisation after the
// barrier, O(threads n) per iteration against the pass's O(m n / threads), stay baseline code.
template <typename T>
T pass_range_dispatch(const PowerArgs<T>& a, int64_t r0, int64_t r1, const T* s, const T* v, T* z, T* jv) {
#ifdef DEQKERN_X86_DISPATCH
  const int isa = cpu::cpu_isa();
  if (isa == 2) return pass_range_avx512(a, r0, r1, s, v, z, jv);
  if (isa == 1) return pass_range_avx2(a, r0, r1, s, v, z, jv);
#endif
  return pass_range(a, r0, r1, s, v, z, jv);
}

#ifdef _OPENMP
// A sense-reversing spin barrier for the threads of one parallel region: an iteration here lasts microseconds,
// and OpenMP's barrier may sleep in the kernel (tens of microseconds to wake). After a bounded spin it yields,
// so an oversubscribed machine still makes progress.
class SpinBarrier {
 public:
  explicit SpinBarrier(int threads) : threads_(threads) {}
  void wait() {
    const int generation = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == threads_ - 1) {
      arrived_.store(0, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_release);
      return;
    }
    for (int spin = 0; generation_.load(std::memory_order_acquire) == generation; ++spin) {
      if (spin > 4096) std::this_thread::yield();
    }
  }

 private:
  const int threads_;
  std::atomic<int> arrived_{0};
  std::atomic<int> generation_{0};
};

// Sample b with the rows of W split between `threads` threads. Thread t writes its partial product and value
// sum into slot [k % 2][t] (and its rows of J v into jv[k % 2]); after the barrier every thread adds up the
// slots in the same order and so takes the same normalised vector and the same stop decision. Two slots by
// parity make one barrier per iteration enough: a thread can only write slot k % 2 again at iteration k + 2,
// after the barrier of k + 1, which every thread passes only once it has read iteration k's slots.
template <typename T>
void solve_sample_split_rows(const PowerArgs<T>& a, int64_t b, int threads) {
  const int64_t ld = a.ld;
  std::vector<T> partial(size_t(2) * threads * ld), sums(size_t(2) * threads);
  std::vector<T> jv(a.symmetric ? size_t(2) * a.m : 0);
  const T* s = a.row_scale ? a.row_scale + b * a.m : nullptr;
  T* v_out = a.v + b * a.ld;
  normalise_into(v_out, v_out, ld);
  int team_size = threads;
  std::unique_ptr<SpinBarrier> barrier;
#pragma omp parallel num_threads(threads)
  {
#pragma omp single
    {
      team_size = omp_get_num_threads();  // may be fewer than asked for
      barrier = std::make_unique<SpinBarrier>(team_size);
    }  // the implicit barrier of `single` publishes team_size and the barrier object
    const int t = omp_get_thread_num(), team = team_size;
    const int64_t rows_per = (a.m + team - 1) / team;
    const int64_t r0 = std::min(a.m, t * rows_per), r1 = std::min(a.m, r0 + rows_per);
    std::vector<T> v(v_out, v_out + ld), z(ld);
    T previous = std::numeric_limits<T>::quiet_NaN(), value = 0;
    int32_t k_done = 0;
    bool converged = false;
    for (int64_t k = 1; k <= a.max_iter; ++k) {
      const size_t slot = size_t(k & 1);
      T* jv_k = jv.empty() ? nullptr : jv.data() + slot * a.m;
      sums[slot * team + t] =
          pass_range_dispatch(a, r0, r1, s, v.data(), partial.data() + (slot * team + t) * ld, jv_k);
      barrier->wait();
      T sum = 0;
      for (int64_t j = 0; j < ld; ++j) z[j] = 0;
      for (int u = 0; u < team; ++u) {
        sum += sums[slot * team + u];
        const T* p = partial.data() + (slot * team + u) * ld;
        for (int64_t j = 0; j < ld; ++j) z[j] += p[j];
      }
      if (!a.symmetric) {
        value = std::sqrt(sum);
      } else {
        value = sum;
        for (int64_t j = 0; j < a.n; ++j) z[j] = T(0.5) * (jv_k[j] + z[j]) + a.shift * v[j];
      }
      normalise_into(z.data(), v.data(), ld);
      k_done = static_cast<int32_t>(k);
      converged = std::abs(value - previous) <= a.tol * std::abs(value);
      if (converged || !std::isfinite(value)) break;
      previous = value;
    }
    if (t == 0) {
      std::copy(v.begin(), v.end(), v_out);
      a.value[b] = value;
      a.iterations[b] = k_done;
      a.converged[b] = converged;
    }
  }
}
#endif

// Copies the (rows, cols) tensor src into the first cols columns of a zeroed (rows, ld) buffer.
at::Tensor padded_copy(const at::Tensor& src, int64_t ld) {
  at::Tensor out = at::zeros({src.size(0), ld}, src.options());
  if (src.numel() > 0) out.narrow(1, 0, src.size(1)).copy_(src);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> power_iteration_cpu(
    const at::Tensor& W_in, const c10::optional<at::Tensor>& row_scale_in, const at::Tensor& u0_in,
    c10::string_view mode, double shift, int64_t max_iter, double tol) {
  const bool symmetric = is_symmetric_power_mode(mode);
  check_power_iteration_args(W_in, row_scale_in, u0_in, symmetric, shift, max_iter, tol);
  const bool has_scale = row_scale_in.has_value() && row_scale_in->defined();
  const at::Tensor row_scale = has_scale ? row_scale_in->contiguous() : at::Tensor();
  const int64_t batch = u0_in.size(0), m = W_in.size(0), n = W_in.size(1);
  at::Tensor value = at::zeros({batch}, W_in.options());
  at::Tensor iterations = at::zeros({batch}, W_in.options().dtype(at::kInt));
  at::Tensor converged = at::zeros({batch}, W_in.options().dtype(at::kBool));
  at::Tensor u;
  AT_DISPATCH_FLOATING_TYPES(W_in.scalar_type(), "deqkern_power_iteration_cpu", [&] {
    const int64_t ld = (n + kLanes<scalar_t> - 1) / kLanes<scalar_t> * kLanes<scalar_t>;
    at::Tensor Wp = padded_copy(W_in, ld);
    at::Tensor v = padded_copy(u0_in, ld);
    at::Tensor z = at::zeros({batch, ld}, W_in.options());
    at::Tensor jv;
    if (symmetric) jv = at::zeros({batch, m}, W_in.options());
    PowerArgs<scalar_t> args;
    static_cast<PowerIterationParams<scalar_t>&>(args) = power_iteration_params<scalar_t>(
        Wp, row_scale, v, value, v, iterations, converged, m, n, symmetric, shift, max_iter, tol);
    args.v = v.mutable_data_ptr<scalar_t>();
    args.z = z.mutable_data_ptr<scalar_t>();
    args.jv = jv.defined() ? jv.mutable_data_ptr<scalar_t>() : nullptr;
    args.ld = ld;
#ifdef _OPENMP
    // Fewer samples than threads and a W too large for one core's L1: split W's rows instead of the samples.
    const int threads = at::get_num_threads();
    if (batch < threads && m * ld >= kSplitRowsMinElements && !at::in_parallel_region()) {
      for (int64_t b = 0; b < batch; ++b) solve_sample_split_rows(args, b, threads);
      u = v.narrow(1, 0, n).contiguous();
      return;
    }
#endif
    // One sample per task: samples are independent, so no thread ever waits for another.
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) { solve_samples_dispatch(args, begin, end); });
    u = v.narrow(1, 0, n).contiguous();
  });
  return {value, u, iterations, converged};
}

}  // namespace

TORCH_LIBRARY_IMPL(deqkern, CPU, m) { m.impl("power_iteration", &power_iteration_cpu); }

}  // namespace deqkern
