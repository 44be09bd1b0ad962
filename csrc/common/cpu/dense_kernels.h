// The building blocks of the dense CPU solve (dense_solve.h): the register-blocked micro-kernel
// y[active] = x[active] @ packed with its tile shapes per ISA, the vectorisable activations, the finiteness test,
// the packing of the matrix and the scratch layout helper.
// Everything is a template or inline, and always inlined into the ISA-specific solve functions of each file.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/activations.h"
#include "common/cpu/simd.h"

namespace deqkern {
namespace cpu {

// Rows of the packed matrix and of the iterate are padded to a multiple of this many bytes, which every
// micro-kernel's column block divides; the padding columns of the packed matrix are 0.
constexpr int64_t kRowAlignBytes = 256;

// A micro-kernel shape: ROWS x VECS accumulators of BYTES-byte vectors, sized to the register file.
template <int BYTES, int ROWS, int VECS>
struct Tile {
  static constexpr int kBytes = BYTES, kRows = ROWS, kVecs = VECS;
};
using TileAvx512 = Tile<64, 4, 4>;    // 16 of 32 zmm registers for accumulators
using TileAvx2 = Tile<32, 4, 2>;      // 8 of 16 ymm
using TileBaseline = Tile<16, 4, 2>;  // 8 of 16 xmm (SSE2 / NEON)

// y[rows, n0 : n0 + cols] = x[rows] @ packed[:, n0 : n0 + cols] for up to kRows rows, with
// kRows x kVecs accumulators held in registers across the whole k loop.
template <typename T, typename TILE, typename ARGS>
DEQKERN_ALWAYS_INLINE void multiply_block(const ARGS& a, const int64_t* rows, int n_rows, int64_t n0) {
  using V = typename VecOf<T, TILE::kBytes>::type;
  constexpr int R = TILE::kRows, NV = TILE::kVecs, L = TILE::kBytes / sizeof(T);
  const T* x_rows[R];
  for (int r = 0; r < R; ++r)  // short tiles repeat their last row; the copy's result is discarded
    x_rows[r] = a.x + rows[r < n_rows ? r : n_rows - 1] * a.ld;
  V acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = V{};
  const T* p = a.packed + n0;
  for (int64_t k = 0; k < a.d; ++k, p += a.ld) {
    V w[NV];
    for (int v = 0; v < NV; ++v) w[v] = *reinterpret_cast<const V*>(p + v * L);
    for (int r = 0; r < R; ++r) {
      const T xk = x_rows[r][k];
      for (int v = 0; v < NV; ++v) acc[r][v] += xk * w[v];
    }
  }
  for (int r = 0; r < n_rows; ++r)
    for (int v = 0; v < NV; ++v) *reinterpret_cast<V*>(a.y + rows[r] * a.ld + n0 + v * L) = acc[r][v];
}

// y[active] = x[active] @ packed. Column blocks outside, row tiles inside: one (d x cols) panel of the
// matrix stays in L1 while every active row passes over it.
template <typename T, typename TILE, typename ARGS>
DEQKERN_ALWAYS_INLINE void multiply_active_rows(const ARGS& a, const int64_t* active, int64_t n_active) {
  constexpr int64_t cols = TILE::kVecs * TILE::kBytes / sizeof(T);
  static_assert(kRowAlignBytes % (TILE::kVecs * TILE::kBytes) == 0, "the padding must fit whole blocks");
  for (int64_t n0 = 0; n0 < a.ld; n0 += cols)
    for (int64_t i = 0; i < n_active; i += TILE::kRows)
      multiply_block<T, TILE>(a, active + i, static_cast<int>(std::min<int64_t>(TILE::kRows, n_active - i)), n0);
}

// tanh to a few ulp with only multiply-add, divide and clamp, so that loops over it vectorise
// (the rational approximation of Eigen's generic_fast_tanh_float). float only; double uses std::tanh.
DEQKERN_ALWAYS_INLINE float fast_tanh(float x) {
  const float clamp = 7.90531110763549805f;  // |tanh| rounds to 1 beyond this
  float xc = x > clamp ? clamp : (x < -clamp ? -clamp : x);
  float x2 = xc * xc;
  float p = -2.76076847742355e-16f;
  p = p * x2 + 2.00018790482477e-13f;
  p = p * x2 + -8.60467152213735e-11f;
  p = p * x2 + 5.12229709037114e-08f;
  p = p * x2 + 1.48572235717979e-05f;
  p = p * x2 + 6.37261928875436e-04f;
  p = p * x2 + 4.89352455891786e-03f;
  float q = 1.19825839466702e-06f;
  q = q * x2 + 1.18534705686654e-04f;
  q = q * x2 + 2.26843463243900e-03f;
  q = q * x2 + 4.89352518554385e-03f;
  float t = xc * p / q;
  return (x < 0.0004f && x > -0.0004f) ? x : t;
}

// t[i] = act(y[i] + c[i]) in place, one activation per loop so that each loop vectorises.
template <typename T>
DEQKERN_ALWAYS_INLINE void apply_activation(ActivationId id, T* y, const T* c, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    if (id == ActivationId::Tanh) {
      for (int64_t i = 0; i < n; ++i) y[i] = fast_tanh(y[i] + c[i]);
      return;
    }
    if (id == ActivationId::Sigmoid) {  // sigmoid(u) = (1 + tanh(u / 2)) / 2
      for (int64_t i = 0; i < n; ++i) y[i] = 0.5f + 0.5f * fast_tanh(0.5f * (y[i] + c[i]));
      return;
    }
  }
  switch (id) {
    case ActivationId::Identity:
      for (int64_t i = 0; i < n; ++i) y[i] = y[i] + c[i];
      break;
    case ActivationId::Relu:
      for (int64_t i = 0; i < n; ++i) {
        T u = y[i] + c[i];
        y[i] = u > T(0) ? u : T(0);
      }
      break;
    case ActivationId::Softsign:
      for (int64_t i = 0; i < n; ++i) {
        T u = y[i] + c[i];
        y[i] = u / (T(1) + (u < T(0) ? -u : u));
      }
      break;
    case ActivationId::Relu6:
      for (int64_t i = 0; i < n; ++i) {
        T u = y[i] + c[i];
        y[i] = u < T(0) ? T(0) : (u > T(6) ? T(6) : u);
      }
      break;
    default:
      for (int64_t i = 0; i < n; ++i) y[i] = activation_forward(id, y[i] + c[i]);
  }
}

// True when p[0 .. n) is all finite: x - x is 0 for finite x and NaN for NaN and +-Inf.
// (An integer AND-reduction, which compilers vectorise without reassociation flags.)
template <typename T>
DEQKERN_ALWAYS_INLINE bool all_finite(const T* p, int64_t n) {
  int ok = 1;
  for (int64_t i = 0; i < n; ++i) ok &= (p[i] - p[i] == T(0));
  return ok != 0;
}

// packed[k, n] = matrix[k, n] for k, n < d, from a matrix with any strides, rows zero-padded to ld. Returns whether
// every entry is finite. The forward solve passes W^T, a column-major view: a row-by-row copy reads one element
// per cache line (and writes down a 4 kB stride at d = 1024). 32 x 32 tiles through an L1 buffer make reads and
// writes both run along cache lines; bands of 32 rows are split between threads. Measured on solves of one
// iteration (2 threads): B=256, d=256 192 -> 117 us; B=32, d=1024 3.4 -> 0.7 ms.
template <typename T>
inline bool pack_matrix(const T* src, int64_t row_stride, int64_t col_stride, int64_t d, int64_t ld, T* packed) {
  constexpr int64_t kTile = 32;
  std::atomic<bool> finite{true};
  const int64_t bands = (d + kTile - 1) / kTile;
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(1, kTile * d));  // small W: one thread
  at::parallel_for(0, bands, grain, [&](int64_t band_begin, int64_t band_end) {
    bool ok = true;
    for (int64_t band = band_begin; band < band_end; ++band) {
      const int64_t k0 = band * kTile, k1 = std::min(d, k0 + kTile);
      if (col_stride == 1) {  // rows are contiguous: a plain copy
        for (int64_t k = k0; k < k1; ++k) std::memcpy(packed + k * ld, src + k * row_stride, d * sizeof(T));
      } else {  // through an L1 tile: writing straight down packed's columns (stride ld, often 4 kB) thrashes L1
        for (int64_t n0 = 0; n0 < d; n0 += kTile) {
          const int64_t n1 = std::min(d, n0 + kTile);
          T tile[kTile][kTile];
          for (int64_t n = n0; n < n1; ++n)
            for (int64_t k = k0; k < k1; ++k) tile[k - k0][n - n0] = src[k * row_stride + n * col_stride];
          for (int64_t k = k0; k < k1; ++k) std::memcpy(packed + k * ld + n0, tile[k - k0], (n1 - n0) * sizeof(T));
        }
      }
      for (int64_t k = k0; k < k1; ++k) {
        std::memset(packed + k * ld + d, 0, (ld - d) * sizeof(T));
        ok = ok && all_finite(packed + k * ld, d);
      }
    }
    if (!ok) finite.store(false, std::memory_order_relaxed);
  });
  return finite.load();
}

// Byte offset of the next buffer in the scratch block, kept 64-byte aligned.
inline int64_t carve(int64_t& offset, int64_t bytes) {
  const int64_t start = offset;
  offset += (bytes + 63) / 64 * 64;
  return start;
}

}  // namespace cpu
}  // namespace deqkern
