"""The cell of the Lipschitz multiscale DEQ (Sato and Iiduka, AISTATS 2026; iiduka-researches/Lipschitz_mdeq,
`mdeq_core.py`) and the proven Lipschitz constant of its map, composed from its parts.

The map f(z, x) on the state z = (z_0, ..., z_{n-1}), z_i of shape (C_i, H / 2^i, W / 2^i), with relu_s(t) =
s max(t, 0), mean-only GroupNorm MG (the group mean subtracted, no division; per-channel scale gamma and shift):

    block_i(z_i) = MG3(relu_s((1 - a) z_i + a MG2(mask_i * conv2(relu_s(MG1(conv1(z_i)))) + [i = 0] injection)))
    y_i = (1 - beta) block_i + beta sum_{j != i} w_ij T_ij(block_j)      (w_i. = softmax(-penalty) over j != i)
    f_i = MG_post(conv_post_i(relu_s(y_i)))                              (MG_post without scale or shift)

T_ij for j > i (a coarser branch): nearest upsampling by 2^(j - i) after MG(conv1x1); for j < i: i - j stride-2
conv3x3 + MG steps with relu_s between them. penalty_ij = j - i for j > i, 0 for j < i (the paper's). With n = 1
there is no fusion: y_0 = block_0.

Lipschitz constant of z -> f(z, x) in the l2 norm of the whole state (per sample). Each factor is bounded:
- a convolution: `lipschitz.conv_operator_norm_upper_bound` on the input shape it sees (proven, 'same' padding,
  stride 2 included); relu_s: s; the dropout mask: its largest entry 1 / (1 - p);
- MG = diag(gamma) P with P the orthogonal projection that subtracts the group means (an affine map whose linear
  part has norm <= max |gamma|; 1 without scale);
- nearest upsampling by 2^k: each value copied 4^k times, norm exactly 2^k;
- sums add, compositions multiply: Lip(block_i) <= l_i = g3 s ((1 - a) + a g2 m ||conv2|| s g1 ||conv1||);
- the fusion: ||f_i(z) - f_i(z')|| <= p_i sum_j c_ij l_j ||z_j - z'_j|| with p_i = s ||conv_post_i||,
  c_ii = 1 - beta, c_ij = beta w_ij Lip(T_ij), so ||f(z) - f(z')|| <= ||N v|| <= ||N||_2 ||z - z'|| for the
  n x n matrix N_ij = p_i c_ij l_j and v_j = ||z_j - z'_j|| (||v|| = ||z - z'||).
L_bar = ||N||_2, evaluated in float64 from the proven factors, times 1 + 1e-12 for its own roundings.

The construction (`certified_kernels`): every convolution's kernel is V min(1, c / sigma_bar(V)) (the paper's
projection to operator norm <= c = 2.0, with a proven bound instead of one power step on the reshaped kernel),
then the post-fusion kernels are multiplied by t = min(1, gamma / L_bar). MG_post is linear and scale-free, so that
makes f exactly t times the map L_bar bounds: Lip(f) <= t L_bar <= gamma < 1 for every weight (up to the rounding of
the kernels in their dtype), in training and in eval. The dropout factor is counted in both, so that t is the same
function of the weights in both modes. The paper's own estimate (`paper_conv_norm`: one power step on the kernel
reshaped to a (C_out, C_in k k) matrix, warm-started across training steps as in its code) can replace the proven
norms (bound="paper"): then nothing is proven, which is what the certificate shows it for.
"""
import math
from typing import Dict, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...lipschitz import conv_operator_norm_upper_bound

BOUNDS = ("proven", "paper")


class ConvSpec(NamedTuple):
    """One convolution of the cell: it reads a (in_channels, H >> level, W >> level) input (the resolution of
    branch `level`) with 'same' padding kernel_size // 2."""

    name: str
    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int
    level: int

    def input_shape(self, height: int, width: int):
        return self.in_channels, height >> self.level, width >> self.level


class MeanOnlyGroupNorm(nn.Module):
    """x minus its group means, times a per-channel scale plus a shift (affine=True; both learned, scale init 1):
    the paper's GroupNorm without the division by the standard deviation, which no Lipschitz bound would hold for.
    Its linear part has norm max |scale| (`lipschitz`)."""

    def __init__(self, groups: int, channels: int, affine: bool = True, device=None, dtype=None):
        super().__init__()
        self.groups, self.channels = math.gcd(groups, channels), channels
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.ones(channels, **factory)) if affine else None
        self.bias = nn.Parameter(torch.zeros(channels, **factory)) if affine else None

    def forward(self, x):
        grouped = x.reshape(x.shape[0], self.groups, -1)
        y = (grouped - grouped.mean(dim=-1, keepdim=True)).reshape(x.shape)
        if self.weight is None:
            return y
        return y * self.weight[:, None, None] + self.bias[:, None, None]

    def lipschitz(self) -> torch.Tensor:
        """max |scale| (1 without one), float64, differentiable in the scale."""
        if self.weight is None:
            return torch.ones((), dtype=torch.float64)
        return self.weight.to(torch.float64).abs().amax()

    def extra_repr(self) -> str:
        return f"groups={self.groups}, channels={self.channels}, affine={self.weight is not None}"


def paper_conv_norm(weight: torch.Tensor, u: torch.Tensor):
    """The paper's estimate of a convolution's norm: one power step on the kernel reshaped to a (C_out, C_in k k)
    matrix from u (C_out,): (sigma, the next u). Both an underestimate of ||reshape||_2 (one step) and a reshaped
    kernel's norm, which is not the convolution's operator norm (1.4-2.3x below it on random 3x3 kernels)."""
    matrix = weight.reshape(weight.shape[0], -1)
    v = F.normalize(matrix.T @ u, dim=0)
    u = F.normalize(matrix @ v, dim=0)
    return torch.dot(u, matrix @ v), u


class LipschitzMultiscaleCell(nn.Module):
    """f(z, x) of the Lipschitz MDEQ (module docstring): z a tuple of n tensors (B, C_i, H / 2^i, W / 2^i); x =
    (injection (B, C_0, H, W), n dropout masks of the branches' shapes or None, the kernels of `certified_kernels`
    in the order of `specs`). The unconstrained kernels V are `weights[name]`."""

    def __init__(self, channels: Sequence[int], expansion: int, groups: int, slope: float, alpha: float, beta: float,
                 conv_norm_max: float, dropout: float, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.channels, self.n = tuple(channels), len(channels)
        self.slope, self.alpha, self.conv_norm_max = slope, alpha, conv_norm_max
        self.beta = beta if self.n > 1 else 0.0  # one branch: nothing to fuse
        self.dropout_factor = 1.0 / (1.0 - dropout)  # the largest entry of an inverted-dropout mask
        specs, norms = [], {}
        for i, c in enumerate(self.channels):
            specs += [ConvSpec(f"b{i}_conv1", c, expansion * c, 3, 1, i), ConvSpec(f"b{i}_conv2", expansion * c, c, 3,
                                                                                  1, i)]
            norms.update({f"b{i}_gn1": MeanOnlyGroupNorm(groups, expansion * c, **factory),
                          f"b{i}_gn2": MeanOnlyGroupNorm(groups, c, **factory),
                          f"b{i}_gn3": MeanOnlyGroupNorm(groups, c, **factory)})
        for i in range(self.n):
            for j in range(self.n):
                if j > i:
                    specs.append(ConvSpec(f"up{j}_{i}", self.channels[j], self.channels[i], 1, 1, j))
                    norms[f"up{j}_{i}_gn"] = MeanOnlyGroupNorm(groups, self.channels[i], **factory)
                for k in range(i - j):  # j < i: i - j stride-2 steps, the last one to C_i
                    out = self.channels[i] if k == i - j - 1 else self.channels[j]
                    specs.append(ConvSpec(f"down{j}_{i}_{k}", self.channels[j], out, 3, 2, j + k))
                    norms[f"down{j}_{i}_{k}_gn"] = MeanOnlyGroupNorm(groups, out, **factory)
        for i, c in enumerate(self.channels):
            specs.append(ConvSpec(f"post{i}", c, c, 1, 1, i))
            norms[f"post{i}_gn"] = MeanOnlyGroupNorm(max(1, groups // 2), c, affine=False, **factory)
        self.specs = tuple(specs)
        self.norms = nn.ModuleDict(norms)
        self.weights = nn.ParameterDict({s.name: nn.Parameter(torch.empty(
            s.out_channels, s.in_channels, s.kernel_size, s.kernel_size, **factory)) for s in specs})
        # the paper's warm-started power-iteration vectors (one per convolution), for bound="paper" and the
        # certificate's paper estimate
        generator = torch.Generator().manual_seed(0)
        for s in specs:
            u = torch.randn(s.out_channels, generator=generator, dtype=torch.float64)
            self.register_buffer(f"paper_u_{s.name}", (u / u.norm()).to(**factory))
        # the fusion weights: softmax(-penalty) over the other branches, constants
        self.mix = [[0.0] * self.n for _ in range(self.n)]
        for i in range(self.n):
            others = [j for j in range(self.n) if j != i]
            if others:
                weights = torch.softmax(-torch.tensor([float(j - i) if j > i else 0.0 for j in others],
                                                      dtype=torch.float64), dim=0)
                for j, w in zip(others, weights.tolist()):
                    self.mix[i][j] = w
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        for s in self.specs:  # PyTorch's Conv2d default: operator norms of order 1, then projected to <= c
            nn.init.kaiming_uniform_(self.weights[s.name], a=math.sqrt(5))

    # ---------------------------------------------------------------- the map
    def _relu(self, t):
        return self.slope * F.relu(t)

    def _conv(self, t, kernels, name, stride=1):
        kernel = kernels[name]
        return F.conv2d(t, kernel, None, stride, kernel.shape[-1] // 2)

    def _transfer(self, j, i, t, kernels):
        """T_ij: branch j's block output into branch i's resolution."""
        if j > i:
            t = self.norms[f"up{j}_{i}_gn"](self._conv(t, kernels, f"up{j}_{i}"))
            return F.interpolate(t, scale_factor=2 ** (j - i), mode="nearest")
        for k in range(i - j):
            if k:
                t = self._relu(t)
            t = self.norms[f"down{j}_{i}_{k}_gn"](self._conv(t, kernels, f"down{j}_{i}_{k}", stride=2))
        return t

    def forward(self, z, x):
        n, a = self.n, self.alpha
        injection, masks = x[0], x[1:1 + n]
        kernels = dict(zip((s.name for s in self.specs), x[1 + n:]))
        blocks = []
        for i in range(n):
            u = self._relu(self.norms[f"b{i}_gn1"](self._conv(z[i], kernels, f"b{i}_conv1")))
            v = self._conv(u, kernels, f"b{i}_conv2")
            if masks[i] is not None:
                v = v * masks[i]
            if i == 0:
                v = v + injection
            v = self.norms[f"b{i}_gn2"](v)
            blocks.append(self.norms[f"b{i}_gn3"](self._relu((1.0 - a) * z[i] + a * v)))
        out = []
        for i in range(n):
            y = blocks[i] if n == 1 else (1.0 - self.beta) * blocks[i]
            for j in range(n):
                if j != i:
                    y = y + (self.beta * self.mix[i][j]) * self._transfer(j, i, blocks[j], kernels)
            out.append(self.norms[f"post{i}_gn"](self._conv(self._relu(y), kernels, f"post{i}")))
        return tuple(out)

    # ---------------------------------------------------------------- the bound
    def transfer_bounds(self, conv_norms: Dict[str, torch.Tensor]):
        """Lip(T_ij) as an n x n nested list of float64 tensors (None on the diagonal)."""
        gn = {name: m.lipschitz().to(next(iter(conv_norms.values())).device) for name, m in self.norms.items()}
        bounds = [[None] * self.n for _ in range(self.n)]
        for i in range(self.n):
            for j in range(self.n):
                if j > i:
                    bounds[i][j] = 2.0 ** (j - i) * gn[f"up{j}_{i}_gn"] * conv_norms[f"up{j}_{i}"]
                elif j < i:
                    b = self.slope ** (i - j - 1)
                    for k in range(i - j):
                        b = b * gn[f"down{j}_{i}_{k}_gn"] * conv_norms[f"down{j}_{i}_{k}"]
                    bounds[i][j] = b
        return bounds, gn

    def lipschitz_bound(self, conv_norms: Dict[str, torch.Tensor]):
        """(L_bar, input_gain): L_bar >= Lip(z -> f(z, x)) (0-dim float64) for convolutions of operator norms <=
        conv_norms[name] (0-dim float64 tensors, differentiable), and input_gain >= the Lipschitz constant of
        f in the injection (which enters block 0 before MG2). Differentiable in the norms and the MG scales."""
        s, a, m = self.slope, self.alpha, self.dropout_factor
        transfer, gn = self.transfer_bounds(conv_norms)
        ell = [gn[f"b{i}_gn3"] * s * ((1.0 - a) + a * gn[f"b{i}_gn2"] * m * conv_norms[f"b{i}_conv2"] * s
                                      * gn[f"b{i}_gn1"] * conv_norms[f"b{i}_conv1"]) for i in range(self.n)]
        rows, injection_column = [], []
        for i in range(self.n):
            post = s * conv_norms[f"post{i}"]  # MG_post has no scale: 1
            coupling = [(1.0 - self.beta) if j == i else self.beta * self.mix[i][j] * transfer[i][j]
                        for j in range(self.n)]
            rows.append(torch.stack([post * c * ell[j] for j, c in enumerate(coupling)]))
            injection_column.append(post * coupling[0])
        bound = torch.linalg.matrix_norm(torch.stack(rows), ord=2) * (1.0 + 1e-12)
        block0_injection = gn["b0_gn3"] * s * a * gn["b0_gn2"]
        input_gain = torch.linalg.vector_norm(torch.stack(injection_column)) * block0_injection * (1.0 + 1e-12)
        return bound, input_gain

    def conv_norms(self, height: int, width: int, bound: str = "proven", update_paper_vectors: bool = False,
                   weights: Dict[str, torch.Tensor] = None):
        """{name: a bound (proven) or the paper's estimate of the norm of each convolution (of V, or of `weights`)
        on an input of height x width}: 0-dim float64 tensors, differentiable in the kernels (the paper's through
        its power step with u held fixed)."""
        norms = {}
        for spec in self.specs:
            kernel = self.weights[spec.name] if weights is None else weights[spec.name]
            if bound == "paper" or update_paper_vectors:  # the vectors follow training either way (the certificate's)
                u = getattr(self, f"paper_u_{spec.name}")
                sigma, u_next = paper_conv_norm(kernel if bound == "paper" else kernel.detach(), u.to(kernel.dtype))
                if update_paper_vectors:
                    with torch.no_grad():
                        u.copy_(u_next.detach())
            norms[spec.name] = sigma.to(torch.float64) if bound == "paper" else conv_operator_norm_upper_bound(
                kernel, spec.input_shape(height, width), stride=spec.stride, padding=spec.kernel_size // 2)
        return norms

    def certified_kernels(self, height: int, width: int, gamma: float, bound: str = "proven",
                          update_paper_vectors: bool = False):
        """(kernels in the order of specs, L_bar of the map they make (<= gamma), L_bar before the scaling t, t,
        the input gain): every V projected to norm <= conv_norm_max by its bound, the post-fusion kernels times t
        = min(1, gamma / L_bar) (module docstring). Differentiable in V and the MG scales. The L_bar returned is that
        of the exact products V * scale; the kernels are those products rounded to V's dtype, whose own bound
        (recomputed from them in float64) is the certificate's. update_paper_vectors: one step of the paper's power
        iteration per kernel (training forwards), whichever the bound."""
        raw = self.conv_norms(height, width, bound, update_paper_vectors)
        kernels, norms = [], {}
        for spec in self.specs:
            V = self.weights[spec.name]
            # the bound in V's dtype rounded up, so that the cast cannot lower it below the float64 value
            upper = (raw[spec.name] * (1.0 + 4.0 * torch.finfo(V.dtype).eps)).to(V.dtype)
            scale = torch.clamp(self.conv_norm_max / upper.clamp_min(torch.finfo(V.dtype).tiny), max=1.0)
            kernels.append(V * scale)
            norms[spec.name] = raw[spec.name] * scale.to(torch.float64)
        unscaled, input_gain = self.lipschitz_bound(norms)
        dtype = kernels[0].dtype
        # clamp_min: a zero map (all post kernels 0, say) gets t = 1 and finite gradients, not 0 * inf
        denominator = unscaled.clamp_min(torch.finfo(torch.float64).tiny)
        t = torch.clamp(gamma * (1.0 - 4.0 * torch.finfo(dtype).eps) / denominator, max=1.0)
        t_cast = t.to(dtype)
        t = t_cast.to(torch.float64)  # the t the kernels are multiplied by, exactly
        first_post = len(self.specs) - self.n
        kernels[first_post:] = [k * t_cast for k in kernels[first_post:]]
        return tuple(kernels), unscaled * t, unscaled, t, input_gain * t
