"""Certified implicit layers: DEQs whose parameterisation guarantees that the fixed point exists, is unique and
is reached by the iteration deqkern runs, each with a `certificate()` that states what is guaranteed.

- `PositiveConcaveDEQ` (pcDEQ; Gabor, Piotrowski and Cavalcante 2024): z = act(W z + s(x)) with W >= 0
  elementwise and a positive, concave, nondecreasing, bounded activation (tanh, softsign, relu6, sigmoid) and a
  strictly positive injection. The map is a positive concave mapping: unique fixed point in the nonnegative orthant
  and geometric convergence of the plain iteration from any z >= 0, with no bound on the size of W.
- `LinfContractiveDEQ` (Jafarpour, Davydov, Proskurnikov and Bullo 2021): x = Phi(A x + B u + b) with
  mu_inf(A) <= mu < 1 by construction; the averaged iteration with alpha* = 1 / (1 - min(min_i a_ii, 0)) is an
  l-infinity contraction and u -> x* is ||B||_inf / (1 - mu_+) Lipschitz in the l-infinity norm.
- `LipschitzDEQ`: z = act(W z + U x + b) with ||W||_2 <= gamma / Lip(act), gamma < 1, kept by rescaling with a
  warm-started power iteration: a 2-norm contraction with explicit forward and backward iteration bounds.

Every layer solves with one fused `deqkern.fixed_point_dense` call (forward) and its implicit backward. The
certificates use `deqkern.lipschitz` (power iteration, one-sided l-infinity measure, l-infinity norm).

One module per layer (positive_concave, linf_contractive, lipschitz_deq); bounds holds the iteration-count maths
of the certificates, _base the state every layer holds (CertifiedDEQ), _options the solver options dict.
"""
from .bounds import picard_iteration_bound
from .linf_contractive import LinfContractionCertificate, LinfContractiveDEQ
from .lipschitz_deq import LipschitzCertificate, LipschitzDEQ
from .positive_concave import (
    POSITIVE_CONCAVE_ACTIVATIONS,
    PositiveConcaveCertificate,
    PositiveConcaveDEQ,
    positive_concave_fixed_point,
)

__all__ = [
    "POSITIVE_CONCAVE_ACTIVATIONS",
    "PositiveConcaveCertificate",
    "PositiveConcaveDEQ",
    "LinfContractionCertificate",
    "LinfContractiveDEQ",
    "LipschitzCertificate",
    "LipschitzDEQ",
    "picard_iteration_bound",
    "positive_concave_fixed_point",
]
