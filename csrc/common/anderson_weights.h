// The mixing weights of one type-II Anderson step: the one small solve of every Anderson kernel (the dense solve and
// anderson_step, CPU and CUDA; triton_kernels/anderson_weights.py is its Triton twin and
// deqkern/reference/anderson.py states it in PyTorch).
//
// With G the Gram matrix of the n stored residuals g_i, the weights minimise ||sum_i a_i g_i||^2 + lam sum_i a_i^2 G_ii
// subject to sum_i a_i = 1: a = y / (1^T y) with A y = 1, A = G + lam diag(G). A is symmetric positive definite
// whenever lam > 0 and no stored residual is zero, so y comes from an L D L^T factorisation without pivoting (n^3 / 6
// flops). Measured against a pivoted LU of the bordered system [[0, 1^T], [1, A]] on five layers, two dtypes and lam
// from 0 to 1e-2: the same evaluation counts everywhere (bench/results/anderson_choice.md). Where a pivot is not > 0
// or the weights are not finite, the caller takes the plain (mixed) Picard step a = e_slot.
#pragma once

#include <cmath>

#include "host_device.h"

namespace deqkern {

using std::isfinite;

// The factorisation and the two triangular solves. V is the lane type: a scalar, or on the CPU a GCC vector of
// doubles that solves several samples side by side, one per lane (every operation below is lane-wise). On entry
// l[i][j] (j <= i < n) holds the lower triangle of G; on exit y = A^{-1} 1, pivot[j] = D_jj and sum = 1^T y.
// With CAP == n known at compile time the loops unroll and the arrays stay in registers.
template <typename V, int CAP>
DEQKERN_HOST_DEVICE void anderson_ldlt_solve(V (&l)[CAP][CAP], int n, V lam, V (&y)[CAP], V (&pivot)[CAP],
                                             V& sum) {
  // L D L^T: l[i][j] holds L_ij D_j during the factorisation, then L_ij; l[j][j] holds 1 / D_j.
  for (int j = 0; j < n; ++j) {
    V dj = l[j][j] + lam * l[j][j];
    for (int k = 0; k < j; ++k) dj -= l[j][k] * l[j][k] * l[k][k];
    pivot[j] = dj;
    for (int i = j + 1; i < n; ++i) {
      V t = l[i][j];
      for (int k = 0; k < j; ++k) t -= l[i][k] * l[j][k] * l[k][k];
      l[i][j] = t;
    }
    l[j][j] = 1.0 / dj;
  }
  for (int j = 0; j < n; ++j)
    for (int i = j + 1; i < n; ++i) l[i][j] *= l[j][j];
  for (int i = 0; i < n; ++i) {  // L w = 1
    V t = V{} + 1.0;  // 1 in every lane
    for (int k = 0; k < i; ++k) t -= l[i][k] * y[k];
    y[i] = t;
  }
  sum = V{};
  for (int i = n - 1; i >= 0; --i) {  // L^T y = D^-1 w
    V t = y[i] * l[i][i];
    for (int k = i + 1; k < n; ++k) t -= l[k][i] * y[k];
    y[i] = t;
    sum += t;
  }
}

// The arrays of one scalar weight solve. A CUDA kernel keeps them in shared memory (one solve per block, by one
// thread): as a local array of the solving thread, the runtime-indexed factor lives in local memory, and the driver
// reserves that stack (2.3 KB in float64) for every thread the GPU can hold, not only for the one that solves.
template <typename A, int CAP>
struct AndersonWorkspace {
  A l[CAP][CAP];
  A y[CAP];
  A pivot[CAP];
};

// The weights of one sample in scalar arithmetic A (float or double). gram: its (n, n) Gram matrix with row stride
// ld (only the lower triangle is read); a: the n weights. Returns false where the caller must take a = e_slot.
template <typename A, int CAP>
DEQKERN_HOST_DEVICE bool anderson_weights(const A* gram, int ld, int n, double lam, A* a,
                                          AndersonWorkspace<A, CAP>& w) {
  A sum;
  for (int i = 0; i < n; ++i)
    for (int j = 0; j <= i; ++j) w.l[i][j] = gram[i * ld + j];
  anderson_ldlt_solve<A, CAP>(w.l, n, A(lam), w.y, w.pivot, sum);
  bool ok = sum != A(0) && isfinite(sum);
  for (int j = 0; j < n; ++j) ok = ok && w.pivot[j] > A(0) && isfinite(w.pivot[j]);
  for (int i = 0; i < n; ++i) {
    a[i] = w.y[i] / sum;
    ok = ok && isfinite(a[i]);
  }
  return ok;
}

// The same with the arrays on the caller's stack (the CPU kernels).
template <typename A, int CAP>
DEQKERN_HOST_DEVICE bool anderson_weights(const A* gram, int ld, int n, double lam, A* a) {
  AndersonWorkspace<A, CAP> w;
  return anderson_weights<A, CAP>(gram, ld, n, lam, a, w);
}

}  // namespace deqkern
