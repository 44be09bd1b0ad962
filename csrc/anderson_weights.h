// The mixing weights of one Anderson step (deqkern/reference.py: _anderson_weights), shared by the CPU and CUDA
// dense Anderson solves: [[0, 1^T], [1, A]] [nu; a] = [1; 0] with A = G + lam diag(G), by Gaussian elimination
// with partial pivoting in float64 (as torch.linalg.solve). A zero pivot or a non-finite solution gives a = e_slot,
// the plain damped step. n <= MAX_HISTORY stored residuals; gram is (m, m) row-major, its first n x n block used.
#pragma once

#include <cmath>

#include "activations.h"  // DEQKERN_HOST_DEVICE

namespace deqkern {

using std::isfinite;

template <int MAX_HISTORY>
DEQKERN_HOST_DEVICE void anderson_weights_bordered(const double* gram, int m, int n, int slot, double lam, double* a) {
  constexpr int N = MAX_HISTORY + 1;
  double h[N][N + 1];
  const int size = n + 1;
  h[0][0] = 0.0;
  h[0][size] = 1.0;
  for (int i = 1; i < size; ++i) {
    h[0][i] = 1.0;
    h[i][0] = 1.0;
    h[i][size] = 0.0;
    for (int j = 1; j < size; ++j) h[i][j] = gram[(i - 1) * m + (j - 1)];
    h[i][i] += lam * gram[(i - 1) * m + (i - 1)];
  }
  bool ok = true;
  for (int col = 0; col < size && ok; ++col) {
    int pivot = col;
    for (int i = col + 1; i < size; ++i)
      if (fabs(h[i][col]) > fabs(h[pivot][col])) pivot = i;
    if (h[pivot][col] == 0.0 || !isfinite(h[pivot][col])) {
      ok = false;
      break;
    }
    if (pivot != col)
      for (int j = col; j <= size; ++j) {
        const double t = h[col][j];
        h[col][j] = h[pivot][j];
        h[pivot][j] = t;
      }
    for (int i = col + 1; i < size; ++i) {
      const double f = h[i][col] / h[col][col];
      for (int j = col; j <= size; ++j) h[i][j] -= f * h[col][j];
    }
  }
  double sol[N];
  for (int i = size - 1; i >= 0 && ok; --i) {
    double s = h[i][size];
    for (int j = i + 1; j < size; ++j) s -= h[i][j] * sol[j];
    sol[i] = s / h[i][i];
    ok = isfinite(sol[i]);
  }
  for (int i = 0; i < n; ++i) a[i] = ok ? sol[i + 1] : (i == slot ? 1.0 : 0.0);
}

}  // namespace deqkern
