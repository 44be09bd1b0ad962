"""Certified convolutional DEQs: z* = f(z*, x) for feature maps z (batch, channels, H, W), the recurrent weight a
stride-1 'same'-padded convolution z -> conv(z, K) (channels -> channels, odd kernel k, zero padding k // 2) and
the injection a 'same'-padded convolution of x. Each layer makes a dense layer's theorem hold for the convolution as
the linear map it is on the input's spatial shape, a (C H W) x (C H W) matrix A, at every forward (training and
eval alike), by its parameterisation:

- `LipschitzConvDEQ` (the 2-norm theory of LipschitzDEQ): ||A||_2 <= gamma / Lip(act) by a PROVEN upper bound of
  the operator norm on the forward's (H, W), `deqkern.lipschitz.conv_operator_norm_upper_bound`. Not the spectral
  norm of the kernel reshaped to (C, C k k), which is the norm of one output pixel's map and underestimates
  ||A||_2 (1.36-2.26x for 3x3 kernels): a layer normalised by it is not a contraction.
- `PositiveConcaveConvDEQ` (pcDEQ's theory): K = softplus(V) >= 0, and a convolution with a nonnegative kernel and
  zero padding is a nonnegative matrix, so z -> act(A z + c) is a positive concave mapping.
- `LinfContractiveConvDEQ` (the l-infinity theory of LinfContractiveDEQ): mu_inf(A) <= mu by a condition on the
  taps of each output channel.

Every layer solves with `deqkern.DEQ` (deqkern.solve, plain Picard iteration from 0, as the dense certified layers
iterate) and differentiates with its implicit-function-theorem backward (an adjoint Picard solve); `f(z, x)` is
the map whose fixed point forward returns. The per-call state (the kernel K the forward used, the injection and
the averaging of the l-infinity layer) goes to the DEQ as its input, so that a backward always uses the K of its
own forward. `last_info` holds the forward SolverInfo (`last_info.backward` after backward), `last_kernel` the K.

One module per layer (lipschitz, positive_concave, linf_contractive); _base holds what they share.
"""
from .linf_contractive import LinfContractiveConvDEQ, LinfConvCertificate
from .lipschitz import KernelBound, LipschitzConvCertificate, LipschitzConvDEQ
from .positive_concave import PositiveConcaveConvDEQ

__all__ = ["KernelBound", "LinfContractiveConvDEQ", "LinfConvCertificate", "LipschitzConvCertificate",
           "LipschitzConvDEQ", "PositiveConcaveConvDEQ"]
