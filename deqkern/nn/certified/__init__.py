"""Certified implicit layers: DEQs whose parameterisation guarantees that the fixed point exists, is unique and
is reached by the iteration deqkern runs, each with a `certificate()` that states what is guaranteed.

- `PositiveConcaveDEQ` (pcDEQ; Gabor, Piotrowski and Cavalcante 2024): z = act(W z + s(x)) with W >= 0
  elementwise and a positive, concave, nondecreasing, bounded activation (tanh, softsign, relu6, sigmoid) and a
  strictly positive injection. The map is a positive concave mapping: unique fixed point in the nonnegative orthant
  and geometric convergence of the plain iteration from any z >= 0, with no bound on the size of W.
- `LinfContractiveDEQ` (Jafarpour, Davydov, Proskurnikov and Bullo 2021): x = Phi(A x + B u + b) with
  mu_inf(A) <= mu < 1 by construction; the averaged iteration with alpha* = 1 / (1 - min(min_i a_ii, 0)) is an
  l-infinity contraction and u -> x* is ||B||_inf / (1 - mu_+) Lipschitz in the l-infinity norm.
- `LipschitzDEQ`: z = act(W z + U x + b) with ||W||_2 <= gamma / Lip(act), gamma < 1, kept at every forward by
  rescaling with a proven upper bound of ||W||_2 (`deqkern.lipschitz.spectral_norm_upper_bound`, from a
  warm-started power iteration's estimate): a 2-norm contraction with explicit forward and backward iteration
  bounds.
- `LipschitzMultiscaleDEQ` (Sato and Iiduka 2026): the multiscale DEQ (one state per resolution) whose map is a
  gamma-contraction in the l2 norm of the whole state, its Lipschitz constant composed at every forward from proven
  bounds of every convolution (lipschitz_multiscale_cell.py) and the kernels scaled to keep it <= gamma.
- Their convolutional versions (`conv`): `LipschitzConvDEQ`, `PositiveConcaveConvDEQ`, `LinfContractiveConvDEQ`,
  whose guarantees hold for the convolution as the linear map it is on the input's shape.

Every dense layer solves with one fused `deqkern.fixed_point_dense` call (forward; Picard, or Anderson where the
guarantee allows it) and its implicit backward, exposes its map `f(z, x)` and takes `jac_reg=`. The certificates
use `deqkern.lipschitz` (power iteration and proven bounds, one-sided l-infinity measure, l-infinity norm) and hold
at every training step.

One module per layer (positive_concave, linf_contractive, lipschitz_deq; the package conv for the convolutional
ones); bounds holds the iteration-count maths of the certificates, positive_concave_rates the proven rates of a
positive concave map, _base the state every dense layer holds (CertifiedDEQ), _options the solver options dict.
"""
from .bounds import picard_iteration_bound
from .conv import LinfContractiveConvDEQ, LipschitzConvDEQ, PositiveConcaveConvDEQ
from .linf_contractive import LinfContractionCertificate, LinfContractiveDEQ
from .lipschitz_multiscale import (LipschitzMultiscaleCertificate, LipschitzMultiscaleDEQ,
                                   LipschitzMultiscaleDEQClassifier)
from .lipschitz_deq import LipschitzCertificate, LipschitzDEQ
from .positive_concave import (
    POSITIVE_CONCAVE_ACTIVATIONS,
    PositiveConcaveCertificate,
    PositiveConcaveDEQ,
    positive_concave_fixed_point,
)

__all__ = [
    "LinfContractiveConvDEQ",
    "LipschitzConvDEQ",
    "PositiveConcaveConvDEQ",
    "POSITIVE_CONCAVE_ACTIVATIONS",
    "PositiveConcaveCertificate",
    "PositiveConcaveDEQ",
    "LinfContractionCertificate",
    "LinfContractiveDEQ",
    "LipschitzCertificate",
    "LipschitzDEQ",
    "LipschitzMultiscaleCertificate",
    "LipschitzMultiscaleDEQ",
    "LipschitzMultiscaleDEQClassifier",
    "picard_iteration_bound",
    "positive_concave_fixed_point",
]
