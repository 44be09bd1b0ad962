"""The operator 2-norm of a convolution as the linear map it is on a given input shape (not of its kernel reshaped
to a matrix, which can be 1.4-2.3x below it for 3x3 kernels): `conv_operator_norm`, a power iteration on
conv_transpose(conv(x)) (a lower bound), and `conv_operator_norm_upper_bound`, a proven upper bound from the
circular convolution that contains it (Sedghi, Gupta and Long 2019). Public as deqkern.lipschitz.<name>.
"""
import math
import numbers

import torch
import torch.nn.functional as F

from ..core import validation
from ..core.api import api_changes
from ..core.errors import PowerIterationWarning
from ..core.policy import check_policy, checks_enabled, enforce_convergence
from .common import (PowerIterationResult, check_iteration_options, default_start, gram_power_iteration,
                     power_of_two_exponent)


_CONVOLUTIONS = {1: (F.conv1d, F.conv_transpose1d), 2: (F.conv2d, F.conv_transpose2d)}


def _conv_ints(what, name, value, count, low):
    """An integer >= low, or `count` of them (a tuple or list), as a tuple of `count` ints."""
    values = tuple(value) if isinstance(value, (tuple, list, torch.Size)) else (value,) * count
    if len(values) != count or not all(_is_int(v) and v >= low for v in values):
        raise ValueError(f"deqkern.{what}: {name} must be an integer >= {low} or {count} such integers, got {value!r}")
    return tuple(int(v) for v in values)


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _conv_power_iteration(forward, adjoint, weight, start, max_iter, tol):
    """gram_power_iteration on conv_transpose(conv(.)) from `start` (input_shape): (value 0-dim, the last unit iterate
    (1, *input_shape), iterations int32 0-dim, converged bool 0-dim)."""
    shape, output_shape = (1, *start.shape), []

    def apply(v):
        y = forward(v.reshape(shape), weight)
        output_shape[:] = y.shape
        return y.reshape(1, -1)

    value, v, iterations, converged = gram_power_iteration(
        apply, lambda w: adjoint(w.reshape(output_shape), weight).reshape(1, -1), start.reshape(1, -1), max_iter, tol)
    return value[0], v.reshape(shape), iterations[0], converged[0]


def _check_conv(what, weight, input_shape, stride, padding, dilation, groups):
    """The checks of a convolution's arguments shared by conv_operator_norm and conv_operator_norm_upper_bound;
    returns (input_shape, stride, padding, dilation, groups, output_padding) as ints and tuples of ints
    (output_padding: what conv_transpose must add to give back input_shape)."""
    validation.check_tensor(what, "weight", weight)
    if weight.dim() not in (3, 4) or 0 in weight.shape:
        raise ValueError(f"deqkern.{what}: weight must be a non-empty 3-D (C_out, C_in / groups, k) conv1d or 4-D "
                         f"(C_out, C_in / groups, kH, kW) conv2d weight, got shape {tuple(weight.shape)}")
    spatial = weight.dim() - 2
    if (not isinstance(input_shape, (tuple, list, torch.Size)) or len(input_shape) != spatial + 1
            or not all(_is_int(s) and s >= 1 for s in input_shape)):
        layout = "(C_in, L)" if spatial == 1 else "(C_in, H, W)"
        raise ValueError(f"deqkern.{what}: input_shape must be {spatial + 1} integers >= 1 {layout} for a "
                         f"{weight.dim()}-D weight, got {input_shape!r}")
    input_shape = tuple(int(s) for s in input_shape)
    stride = _conv_ints(what, "stride", stride, spatial, 1)
    padding = _conv_ints(what, "padding", padding, spatial, 0)
    dilation = _conv_ints(what, "dilation", dilation, spatial, 1)
    groups = validation.check_int(what, "groups", groups, 1)
    c_out, c_in_per_group = weight.shape[:2]
    if c_out % groups:
        raise ValueError(f"deqkern.{what}: groups={groups} must divide the weight's C_out = {c_out}")
    if input_shape[0] != c_in_per_group * groups:
        raise ValueError(f"deqkern.{what}: input_shape has {input_shape[0]} channels but the weight takes "
                         f"{c_in_per_group} per group x groups={groups} = {c_in_per_group * groups}")
    output_padding = []
    for size, k, s, p, d in zip(input_shape[1:], weight.shape[2:], stride, padding, dilation):
        span = size + 2 * p - d * (k - 1) - 1  # (output size - 1) * stride + the remainder the conv drops
        if span < 0:
            raise ValueError(f"deqkern.{what}: the convolution output is empty: input_shape {input_shape} padded by "
                             f"{padding} is smaller than the dilated kernel {tuple(weight.shape[2:])} (dilation "
                             f"{dilation})")
        output_padding.append(span % s)  # < stride: what conv_transpose must add to give back `size`
    return input_shape, stride, padding, dilation, groups, tuple(output_padding)


@api_changes("lipschitz.conv_operator_norm", renamed={"n_iter": "max_iter"},
             old_positional=("stride", "padding", "dilation", "groups", "max_iter", "tol", "u0", "on_nonconvergence"))
def conv_operator_norm(weight, input_shape, *, stride=1, padding=0, dilation=1, groups=1, max_iter=1000, tol=1e-6,
                       u0=None, on_nonconvergence="warn"):
    """||conv||_2 of x -> conv(x, weight, stride, padding, dilation, groups) on inputs of shape input_shape
    ((C_in, H, W) for a conv2d weight, (C_in, L) for conv1d): a lower bound by power iteration on conv_transpose(conv(.))
    (`gram_power_iteration`). The kernel reshaped to a matrix underestimates it 1.36-2.26x on 3x3 kernels. u0 (of
    input_shape) warm-starts; the value is differentiable in weight with u held fixed. Returns PowerIterationResult
    (value 0-dim, u of input_shape, iterations, converged). Measurements and caveats: docs/diagnostics.md.
    """
    what = "lipschitz.conv_operator_norm"
    input_shape, stride, padding, dilation, groups, output_padding = _check_conv(
        what, weight, input_shape, stride, padding, dilation, groups)
    spatial = weight.dim() - 2
    check_iteration_options(what, max_iter, tol)
    check_policy(what, on_nonconvergence)
    if u0 is not None:
        validation.check_tensor(what, "u0", u0, like=weight, like_name="weight")
        if tuple(u0.shape) != input_shape:
            raise ValueError(f"deqkern.{what}: u0 must be of input_shape {input_shape}, got shape {tuple(u0.shape)}")
    checks = checks_enabled(on_nonconvergence)
    if checks:
        validation.check_finite(what, weight=weight, u0=u0)
        if u0 is not None and not bool((u0 != 0).any()):
            raise ValueError(f"deqkern.{what}: u0 is all zero: the start vector must be nonzero")

    conv, conv_transpose = _CONVOLUTIONS[spatial]
    options = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)

    def forward(x, w):
        return conv(x, w, None, **options)

    def adjoint(y, w):
        return conv_transpose(y, w, None, output_padding=tuple(output_padding), **options)

    # 2^-e with max|weight| 2^-e in [0.5, 1): a float tensor (the gradient of torch.ldexp in its input is 0 for an
    # integer exponent), exact, so value / scale is exact too.
    scale = torch.ldexp(torch.ones((), dtype=weight.dtype, device=weight.device),
                        -power_of_two_exponent(weight.detach()).to(weight.dtype))
    default = default_start(math.prod(input_shape), weight.dtype, weight.device).reshape(input_shape)
    with torch.no_grad():
        scaled = weight.detach() * scale
        start = default if u0 is None else u0.detach()
        estimate, u, iterations, converged = _conv_power_iteration(forward, adjoint, scaled, start, max_iter, tol)
        if checks and u0 is not None and bool(estimate == 0):  # conv(u0) = 0: start again from the default vector
            estimate, u, iterations, converged = _conv_power_iteration(forward, adjoint, scaled, default, max_iter,
                                                                       tol)
    value = torch.linalg.vector_norm(forward(u, weight * scale)) / scale
    enforce_convergence(what, converged, value.detach(), on_nonconvergence, tol=tol, max_iter=max_iter,
                        inputs=dict(weight=weight.detach(), u0=u0), quantity="operator norm estimate",
                        advice="the value is a lower bound; raise max_iter, or warm-start from the returned u",
                        warning=PowerIterationWarning, stacklevel=3)
    return PowerIterationResult(value, u[0], iterations, converged)


def _live_taps(size, k, s, p, d):
    """The taps j (0 <= j < k) of one spatial dimension that read an input position (not the zero padding) for
    some kept output i: p <= i s + j d <= p + size - 1 with 0 <= i < L_out. The others multiply only zeros."""
    out = (size + 2 * p - d * (k - 1) - 1) // s + 1
    live = []
    for j in range(k):
        first = max(0, -(-(p - j * d) // s))  # the first output whose read i s + j d reaches the input
        if first < out and first * s + j * d <= p + size - 1:
            live.append(j)
    return live, out


def _tap_phases(offsets, s, n_freq, grid, device):
    """(k, s, n_freq) complex128: P[j, r, f] = exp(2 pi i a_j f / grid) where tap j sits at offsets[j] = a_j s + r_j
    on the grid, and r == r_j (0 otherwise): the phase of tap j in polyphase component r at frequency f. The angle
    is reduced modulo grid in integers first, so it is exact before the one rounding of cos and sin."""
    offsets = torch.as_tensor(offsets, dtype=torch.int64, device=device)
    shift, phase = offsets // s, offsets % s
    f = torch.arange(n_freq, device=device)
    angle = (shift[:, None] * f[None, :]) % grid * (2 * math.pi / grid)
    exps = torch.polar(torch.ones_like(angle, dtype=torch.float64), angle.to(torch.float64))
    onehot = (phase[:, None] == torch.arange(s, device=device)[None, :]).to(torch.complex128)
    return onehot[:, :, None] * exps[:, None, :]


def _conv_symbol(weight, phases, groups, first=None):
    """The per-frequency matrices of the circular polyphase convolution: (F, groups, C_out / groups, C_in / groups *
    prod(stride)), F the frequencies of the first grid dimension (or those indexed by `first`) times those of the
    others. weight: (C_out, C_in / groups, *k) complex128; phases: one (k, s, n_freq) tensor per spatial dimension."""
    if first is not None:
        phases = [phases[0][:, :, first], *phases[1:]]
    if len(phases) == 1:
        symbol = torch.einsum("ocj,jaf->foca", weight, phases[0])
    else:
        symbol = torch.einsum("ocij,iap,jbq->pqocab", weight, phases[0], phases[1])
    c_out, c_in = weight.shape[:2]
    return symbol.reshape(-1, groups, c_out // groups, c_in * math.prod(p.shape[1] for p in phases))


# The symbol K(f) is evaluated in chunks of about this many complex entries (memory stays bounded)
SYMBOL_CHUNK_ENTRIES = 1 << 22


# the proof's loop over frequency chunks and its checks are Python: under torch.compile it runs eagerly behind a
# graph break (its value stays differentiable), where tracing it failed inside Dynamo
@torch.compiler.disable
@api_changes("lipschitz.conv_operator_norm_upper_bound", old_positional=("stride", "padding", "dilation", "groups"))
def conv_operator_norm_upper_bound(weight, input_shape, *, stride=1, padding=0, dilation=1, groups=1):
    """A proven upper bound of ||conv||_2, the operator 2-norm of x -> conv(x, weight, stride, padding, dilation,
    groups) (no bias) on inputs of shape input_shape = (C_in, H, W), or (C_in, L) for a conv1d weight
    (C_out, C_in / groups, k): the counterpart of `conv_operator_norm`, whose power iteration is a lower bound.
    Returns a 0-dim float64 tensor on weight's device, differentiable in weight.

    Theorem (Sedghi, Gupta and Long 2019, "The singular values of convolutional layers", extended to strides by a
    polyphase split). Per spatial dimension (size L, kernel k, stride s, padding p, dilation d, L_out outputs):
    1. Taps that, for every kept output i, read only the zero padding (i s + j d outside [p, p + L - 1]) multiply
       zeros: the operator does not depend on them, and they are set to 0. Let lo and hi be the first and last of
       the others (none: the conv is 0, and so is the bound).
    2. Shifted by lo d, every read of a kept output is u = i s + (j - lo) d in [0, R), R = (L_out - 1) s +
       (hi - lo) d + 1 <= L + 2 p. Put the input positions read there (the others are never read) on a circular
       grid of n points, n the smallest multiple of s with n >= R (the embedding E, a coordinate restriction:
       ||E|| <= 1). No read wraps around the grid, so conv = P C E with C the circular stride-s convolution on the
       grid and P the selection of the kept outputs u = i s, distinct (||P|| <= 1): ||conv||_2 <= ||C||_2.
    3. Splitting the grid into its s polyphase components (x_r[m] = x[m s + r]; tap j, at (j - lo) d = a_j s + r_j,
       reads component r_j shifted by a_j) makes C a sum of circular convolutions on n / s points, which the DFT
       block-diagonalises: ||C||_2 = max over the n / s DFT frequencies f (per dimension) of the largest singular
       value of the (C_out / groups) x (C_in / groups * s_H * s_W) matrix
       K(f)[o, (c, r)] = sum_{j: r_j = r} w[o, c, j] exp(2 pi i a_j f / (n / s)), and max over the groups (the conv
       is block diagonal in them). Real weights give K(-f) = conj(K(f)), so only the frequencies f_last in
       [0, (n / s) // 2] of the last dimension are evaluated.

    Rounding: K(f) is evaluated directly (not by an FFT), in float64: each entry is a sum of at most k taps with
    phases rounded once, so its error is at most gamma_(k_H + k_W + 4) sum_j |w_ocj| and
    ||dK(f)||_2 <= gamma sqrt(k_H k_W) ||w||_F; by Parseval some frequency has ||K(f)||_F >= ||w||_F / sqrt(groups),
    so the bound is >= ||w||_F / sqrt(groups min(m, n)) (K(f) is m x n). With LAPACK's backward error for the
    singular values taken as 10 max(m, n) eps, the computed value times 1 + margin,
    margin = 1e-10 + 16 eps ((k_H + k_W + 4) sqrt(k_H k_W groups min(m, n)) + 10 max(m, n)), is >= ||C||_2: the
    1e-10 dominates up to thousands of channels (16 eps (7 sqrt(9 * 1024) + 10240) = 4e-11 for 1024 channels, 3x3).
    The weight is scaled by a power of two (exactly) first: no overflow or underflow whatever its size.

    Tightness: exact (up to the margin) for 1x1 kernels and when every kept output reads one position per tap
    range (a 1x1 map under a 'same' kxk conv: only the centre tap is live); otherwise the circular operator
    overestimates at the border of the padding, so the ratio to ||conv||_2 falls with the input size. Measured
    against the explicitly built conv matrix (N(0, 1) weights; tests/test_lipschitz.py and
    tests/test_certified_conv.py): 'same'-padded 3x3, 4 channels, seeds 0-3: 1.11-1.20 on 4x4 inputs, 1.02-1.05
    on 8x8, 1.005-1.014 on 16x16, 1.001-1.006 on 24x24; the cases of tests/test_lipschitz.py (5x6 to 9x12 inputs,
    stride 2 and 3, dilation 2, groups 2, 1-D; seeds 0-9): 1.00-1.31. The polyphase split matters for strides: the
    stride-1 bound (valid for a strided conv but looser) was 1.2-2.0x the norm on those cases.

    Gradient: the value is the top singular value of K(f*) at the maximising frequency f* (found without grad),
    recomputed with grad, so the gradient is that of ||C||_2 wherever f* and its top singular value are unique up to
    the conjugate pair (-f*), a.e.; elsewhere a subgradient. Cost: one batched SVD of ~ (n_H / s_H)(n_W / s_W) / 2
    small complex matrices (chunked: memory stays bounded; 0.23 s for 64 channels on 32x32 on one CPU thread), one
    host synchronisation (the finiteness check). Raises ValueError for NaN or Inf weights and for the argument errors of
    conv_operator_norm.
    """
    what = "lipschitz.conv_operator_norm_upper_bound"
    input_shape, stride, padding, dilation, groups, _ = _check_conv(
        what, weight, input_shape, stride, padding, dilation, groups)
    validation.check_finite(what, weight=weight)
    crop, mask, phases, n_freq = [], [], [], []
    for size, k, s, p, d in zip(input_shape[1:], weight.shape[2:], stride, padding, dilation):
        live, out = _live_taps(size, k, s, p, d)
        if not live:  # every read is padding: the conv is 0
            return weight.to(torch.float64).sum() * 0.0
        lo, hi = live[0], live[-1]
        crop.append(slice(lo, hi + 1))
        mask.append(torch.tensor([j in live for j in range(lo, hi + 1)], dtype=torch.float64, device=weight.device))
        grid = -(-((out - 1) * s + (hi - lo) * d + 1) // s)  # n / s
        # one live tap (a 1x1 kernel, or a map so small that one tap reads it): every phase is 1, K(f) is the same
        # matrix at every frequency of this dimension, so one frequency gives the maximum
        n_freq.append(grid if hi > lo else 1)
        phases.append((range(0, (hi - lo) * d + 1, d), s, grid))
    n_freq[-1] = n_freq[-1] // 2 + 1  # the last dimension's frequencies up to the conjugate symmetry
    phases = [_tap_phases(offsets, s, nf, grid, weight.device) for (offsets, s, grid), nf in zip(phases, n_freq)]
    live_mask = mask[0] if len(mask) == 1 else mask[0][:, None] * mask[1][None, :]
    kernel = [sl.stop - sl.start for sl in crop]
    # 2^-e with max|weight| 2^-e in [0.5, 1): exact, so value / scale is exact too
    scale = torch.ldexp(torch.ones((), dtype=torch.float64, device=weight.device),
                        -power_of_two_exponent(weight.detach()).to(torch.float64))
    rows, cols = weight.shape[0] // groups, weight.shape[1] * math.prod(stride)
    eps = torch.finfo(torch.float64).eps
    margin = 1e-10 + 16 * eps * ((sum(kernel) + 4) * math.sqrt(math.prod(kernel) * groups * min(rows, cols))
                                 + 10 * max(rows, cols))

    def live_weight(w):
        return (w[(slice(None), slice(None), *crop)].to(torch.float64) * live_mask * scale).to(torch.complex128)

    # frequencies of the first dimension per chunk: about SYMBOL_CHUNK_ENTRIES complex entries of K(f) at a time
    per_first = math.prod(n_freq[1:])
    chunk = max(1, SYMBOL_CHUNK_ENTRIES // (per_first * weight.shape[0] * cols))
    with torch.no_grad():
        w = live_weight(weight.detach())
        best = best_at = None
        for start in range(0, n_freq[0], chunk):
            first = torch.arange(start, min(start + chunk, n_freq[0]), device=weight.device)
            top = torch.linalg.svdvals(_conv_symbol(w, phases, groups, first))[..., 0].amax(dim=1)  # (F,)
            value, at = top.max(dim=0)
            at = at + start * per_first  # the index among all frequencies, flattened
            if best is None:
                best, best_at = value, at
            else:  # on the device: no host read per chunk (the first maximum is kept, as max(dim=0) keeps it)
                better = value > best
                best, best_at = torch.where(better, value, best), torch.where(better, at, best_at)
    # the maximising frequency again, with grad
    symbol = _conv_symbol(live_weight(weight), phases, groups, (best_at // per_first).reshape(1))[best_at % per_first]
    top = torch.linalg.svdvals(symbol)[..., 0].max()
    top = top + (best - top.detach())  # exactly the batched maximum, with the gradient of sigma_1(K(f*))
    return top / scale * (1.0 + margin)
