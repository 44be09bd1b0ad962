"""The multiscale DEQ (MDEQ; Bai, Koltun and Kolter 2020, locuslab/mdeq `lib/models/mdeq_core.py`): one state per
resolution, solved together as one fixed point by `nn.DEQ` on a tuple state.

- `MultiscaleCell`, the map f(z, x) of the MDEQ: n branches at resolutions H / 2^i with C_i channels; per branch a
  residual block (conv3x3 -> GroupNorm -> ReLU -> conv3x3 -> variational dropout -> + injection (the highest
  resolution branch only) -> GroupNorm -> + residual -> ReLU -> GroupNorm), then the multiresolution fusion: into
  branch i the sum of every branch j, downsampled by i - j chains of stride-2 conv3x3 + GroupNorm (ReLU between) or
  upsampled by conv1x1 + GroupNorm + nearest-neighbour upsampling by 2^(j - i), then ReLU -> conv1x1 -> GroupNorm.
- `MultiscaleDEQ`: the injection (conv3x3 -> GroupNorm -> ReLU into the first branch) and the cell, solved by
  `nn.DEQ` (Anderson by default, every backward mode, `jac_reg=` for the Jacobian-regularised MDEQ); forward(x,
  z0=None) returns the tuple of the n branches' states.
- `MultiscaleDEQClassifier`: MDEQ's classification head on it (per branch a channel increase, each branch
  downsampled into the next and summed, conv1x1, global average pooling, linear).

GroupNorm, not BatchNorm, everywhere: every sample's map is its own, so a solve's per-sample statistics (and the
Jacobian tools) mean what they say. The TINY configuration of the paper's CIFAR-10 model is
`MultiscaleDEQ(3, channels=(8, 16, 32), expansion=5, groups=8, dropout=0.15, weight_norm=True)` with the classifier's
`head_channels=(4, 8, 16), final_channels=128`.
"""
import contextlib
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..core import validation
from ..core.api import api_changes
from ..core.info import SolverInfo
from .deq import DEQ

def _group_norm(groups, channels, dtype=None, device=None):
    """GroupNorm with `groups` groups, or the largest divisor of `channels` below it (a channel count that groups
    does not divide would be an error at construction, far from its cause)."""
    return nn.GroupNorm(math.gcd(groups, channels), channels, affine=True, device=device, dtype=dtype)


def _conv(in_channels, out_channels, kernel_size, stride=1, weight_norm=False, **factory):
    """A bias-free conv of the cell, initialised N(0, 0.01) as MDEQ's init_weights does (small recurrent weights:
    the iteration starts near the injection; PyTorch's default init makes the first solves hit max_iter)."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False,
                     **factory)
    with torch.no_grad():
        conv.weight.normal_(0.0, 0.01)
    return nn.utils.parametrizations.weight_norm(conv) if weight_norm else conv


class _ResidualBlock(nn.Module):
    """One branch's residual block; `dropout_mask` (or None) and `injection` (or None) are per solve."""

    def __init__(self, channels, expansion, groups, weight_norm, factory):
        super().__init__()
        wide = expansion * channels
        self.conv1 = _conv(channels, wide, 3, weight_norm=weight_norm, **factory)
        self.norm1 = _group_norm(groups, wide, **factory)
        self.conv2 = _conv(wide, channels, 3, weight_norm=weight_norm, **factory)
        self.norm2 = _group_norm(groups, channels, **factory)
        self.norm3 = _group_norm(groups, channels, **factory)

    def forward(self, z, injection, dropout_mask):
        out = self.conv2(F.relu(self.norm1(self.conv1(z))))
        if dropout_mask is not None:
            out = out * dropout_mask
        if injection is not None:
            out = out + injection
        return self.norm3(F.relu(self.norm2(out) + z))


class MultiscaleCell(nn.Module):
    """f(z, x) of the MDEQ: z a tuple of n tensors (B, C_i, H / 2^i, W / 2^i); x = (injection into the first branch
    (B, C_0, H, W), dropout masks: a tuple of n tensors of the branches' shapes, or None). Returns a tuple of z's
    shapes."""

    def __init__(self, channels: Sequence[int], expansion: int = 5, groups: int = 4, weight_norm: bool = False,
                 device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.channels = tuple(channels)
        n = len(self.channels)
        self.blocks = nn.ModuleList(_ResidualBlock(c, expansion, groups, weight_norm, factory) for c in channels)
        self.fuse = nn.ModuleList()
        for i in range(n):
            row = nn.ModuleList()
            for j in range(n):
                if j == i:
                    row.append(nn.Identity())
                elif j > i:  # a lower resolution into a higher one: conv1x1, GroupNorm, nearest upsampling
                    row.append(nn.Sequential(_conv(channels[j], channels[i], 1, weight_norm=weight_norm, **factory),
                                             _group_norm(groups, channels[i], **factory),
                                             nn.Upsample(scale_factor=2 ** (j - i), mode="nearest")))
                else:  # a higher resolution into a lower one: i - j stride-2 conv3x3 + GroupNorm, ReLU between
                    steps = []
                    for k in range(i - j):
                        out = channels[i] if k == i - j - 1 else channels[j]
                        steps += [_conv(channels[j], out, 3, stride=2, weight_norm=weight_norm, **factory),
                                  _group_norm(groups, out, **factory)]
                        if k < i - j - 1:
                            steps.append(nn.ReLU())
                    row.append(nn.Sequential(*steps))
            self.fuse.append(row)
        self.post_fuse = nn.ModuleList(
            nn.Sequential(nn.ReLU(), _conv(c, c, 1, weight_norm=weight_norm, **factory),
                          _group_norm(max(1, groups // 2), c, **factory)) for c in channels)

    def forward(self, z, x):
        injection, masks = x
        blocks = [block(z_i, injection if i == 0 else None, None if masks is None else masks[i])
                  for i, (block, z_i) in enumerate(zip(self.blocks, z))]
        return tuple(post(sum(fuse(b) for fuse, b in zip(row, blocks)))
                     for row, post in zip(self.fuse, self.post_fuse))


class MultiscaleLayer(nn.Module):
    """What the multiscale DEQs share (MultiscaleDEQ, nn.certified.LipschitzMultiscaleDEQ): the option checks, the
    branches' shapes, the input checks, the variational dropout masks, the forward around `self.deq` (an nn.DEQ on
    the tuple state) and the map f(z, x) of the input itself. A layer defines `_cell_inputs(x, shapes, masks)`, the
    x its cell is solved with, and may define `_forward_context()`, entered around the forward."""

    def _init_branches(self, what, in_channels, channels, expansion, groups, dropout):
        validation.check_int(what, "in_channels", in_channels, 1)
        if not isinstance(channels, (tuple, list)) or len(channels) == 0:
            raise ValueError(f"deqkern.{what}: channels must be a non-empty tuple of channel counts, one per branch, "
                             f"got {channels!r}")
        for i, c in enumerate(channels):
            validation.check_int(what, f"channels[{i}]", c, 1)
        validation.check_int(what, "expansion", expansion, 1)
        validation.check_int(what, "groups", groups, 1)
        dropout = validation.check_fraction(what, "dropout", dropout)
        self.in_channels, self.channels, self.dropout = in_channels, tuple(int(c) for c in channels), dropout

    @property
    def last_info(self) -> Optional[SolverInfo]:
        return self.deq.last_info

    @property
    def last_jac_loss(self) -> Optional[torch.Tensor]:
        return self.deq.last_jac_loss

    def state_shapes(self, height: int, width: int):
        """The per-sample shapes (C_i, H / 2^i, W / 2^i) of the branches for an input of height x width."""
        return tuple((c, height >> i, width >> i) for i, c in enumerate(self.channels))

    def _check_input(self, x):
        what = f"nn.{type(self).__name__}"
        validation.check_tensor(what, "x", x, dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64))
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"deqkern.{what}: x must be (batch, in_channels={self.in_channels}, H, W), got shape "
                             f"{tuple(x.shape)}")
        self._check_resolution(what, x.shape[2], x.shape[3])
        return self.state_shapes(x.shape[2], x.shape[3])

    def _check_resolution(self, what, height, width):
        factor = 2 ** (len(self.channels) - 1)
        if height % factor or width % factor or 0 in (height, width):
            raise ValueError(f"deqkern.{what}: H and W must be positive multiples of 2^(branches - 1) = {factor} "
                             f"(each branch halves the resolution, and upsampling must give it back), got "
                             f"{(height, width)}")

    def dropout_masks(self, like_shapes, reference: torch.Tensor):
        """One variational dropout mask per branch for this solve (training and dropout > 0), else None."""
        if not self.training or self.dropout == 0.0:
            return None
        keep = 1.0 - self.dropout
        return tuple(torch.bernoulli(reference.new_full((reference.shape[0], *shape), keep)) / keep
                     for shape in like_shapes)

    def _forward_context(self):
        return contextlib.nullcontext()

    def _cell_inputs(self, x, shapes, masks):
        raise NotImplementedError

    def forward(self, x: torch.Tensor, z0=None):
        """x: (B, in_channels, H, W); z0: a tuple of the branches' states to start from (default zeros). Returns
        the tuple of the n equilibria."""
        shapes = self._check_input(x)
        if z0 is None:
            z0 = tuple(x.new_zeros((x.shape[0], *shape)) for shape in shapes)
        with self._forward_context():
            return self.deq(self._cell_inputs(x, shapes, masks=True), z0=z0)

    def f(self, z, x: torch.Tensor):
        """The map whose fixed point forward returns, as a function of the input x itself (B, in_channels, H, W)
        and a state z (the tuple of the branches' tensors), without dropout: for the Jacobian tools
        (deqkern.jacobian_norm(layer, z, x)). Differentiable in z, x and the parameters."""
        shapes = self._check_input(x)
        with self._forward_context():
            return self.deq.f(z, self._cell_inputs(x, shapes, masks=False))

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, channels={self.channels}, dropout={self.dropout}"


class MultiscaleDEQ(MultiscaleLayer):
    """Multiscale DEQ: x (B, in_channels, H, W) -> the equilibrium of every branch, a tuple of n tensors
    (B, channels[i], H / 2^i, W / 2^i); H and W divisible by 2^(n - 1). The solver statistics of the latest forward
    are `last_info` (its `backward` after the IFT backward).

    channels: C_i per branch (n = len(channels) >= 1); expansion: the residual block's width factor; groups: its
    GroupNorm groups; dropout: variational dropout after each block's second conv (one mask per branch for the whole
    solve, training only); weight_norm: weight-normalised convolutions. method, backward, solver_options,
    backward_options, phantom_steps, phantom_damping, jac_reg: those of `nn.DEQ` (jac_reg=(w, p): the Hutchinson
    Jacobian penalty of Bai et al. 2021 applied with probability p per batch).
    """

    @api_changes("MultiscaleDEQ")
    def __init__(self, in_channels: int, channels: Sequence[int] = (8, 16), *, expansion: int = 5, groups: int = 4,
                 dropout: float = 0.0, weight_norm: bool = False, method: str = "anderson", backward: str = "ift",
                 solver_options: Optional[dict] = None, backward_options: Optional[dict] = None,
                 phantom_steps: int = 5, phantom_damping: float = 0.8, jac_reg=None, device=None, dtype=None):
        super().__init__()
        self._init_branches("MultiscaleDEQ", in_channels, channels, expansion, groups, dropout)
        factory = {"device": device, "dtype": dtype}
        self.injection = nn.Sequential(nn.Conv2d(in_channels, channels[0], 3, padding=1, bias=False, **factory),
                                       _group_norm(groups, channels[0], **factory), nn.ReLU())
        self.cell = MultiscaleCell(channels, expansion, groups, weight_norm, **factory)
        self._weight_normalised = [m for m in self.cell.modules() if nn.utils.parametrize.is_parametrized(m, "weight")]
        self.deq = DEQ(self.cell, method=method, backward=backward, solver_options=solver_options,
                       backward_options=backward_options, phantom_steps=phantom_steps,
                       phantom_damping=phantom_damping, jac_reg=jac_reg)

    @contextlib.contextmanager
    def _forward_context(self):
        with nn.utils.parametrize.cached():  # weight-normalised weights computed once per forward, not per solve step
            for conv in self._weight_normalised:
                conv.weight  # noqa: B018  (cached here, with the caller's grad mode: the solve runs under no_grad)
            yield

    def _cell_inputs(self, x, shapes, masks):
        injection = self.injection(x)
        return injection, (self.dropout_masks(shapes, injection) if masks else None)


class MultiscaleDEQClassifier(nn.Module):
    """x (B, in_channels, H, W) -> logits (B, num_classes): a MultiscaleDEQ and MDEQ's classification head.

    head_channels: the channels each branch is raised to (conv3x3 -> GroupNorm -> ReLU); each branch's result is
    downsampled (stride-2 conv3x3 -> GroupNorm -> ReLU) into the next and summed; then conv1x1 to final_channels ->
    GroupNorm -> ReLU, global average pooling and a linear layer. Every other keyword goes to MultiscaleDEQ.
    """

    DEQ_CLASS = MultiscaleDEQ  # the multiscale layer under the head (LipschitzMultiscaleDEQClassifier changes it)

    @api_changes("MultiscaleDEQClassifier")
    def __init__(self, in_channels: int, num_classes: int, channels: Sequence[int] = (8, 16), *,
                 head_channels: Optional[Sequence[int]] = None, final_channels: int = 64, groups: int = 4,
                 device=None, dtype=None, **deq_options):
        super().__init__()
        what = "MultiscaleDEQClassifier"
        validation.check_int(what, "num_classes", num_classes, 1)
        validation.check_int(what, "final_channels", final_channels, 1)
        factory = {"device": device, "dtype": dtype}
        self.deq = self.DEQ_CLASS(in_channels, channels, groups=groups, device=device, dtype=dtype, **deq_options)
        head_channels = tuple(head_channels) if head_channels is not None else tuple(self.deq.channels)
        if len(head_channels) != len(self.deq.channels):
            raise ValueError(f"deqkern.{what}: head_channels needs one count per branch ({len(self.deq.channels)}), "
                             f"got {head_channels!r}")
        for i, c in enumerate(head_channels):
            validation.check_int(what, f"head_channels[{i}]", c, 1)

        def conv_norm_relu(cin, cout, kernel_size, stride=1):
            return nn.Sequential(nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=kernel_size // 2, **factory),
                                 _group_norm(groups, cout, **factory), nn.ReLU())

        self.increase = nn.ModuleList(conv_norm_relu(c, h, 3) for c, h in zip(self.deq.channels, head_channels))
        self.downsample = nn.ModuleList(conv_norm_relu(head_channels[i], head_channels[i + 1], 3, stride=2)
                                        for i in range(len(head_channels) - 1))
        self.final = conv_norm_relu(head_channels[-1], final_channels, 1)
        self.classifier = nn.Linear(final_channels, num_classes, **factory)

    @property
    def last_info(self) -> Optional[SolverInfo]:
        return self.deq.last_info

    def forward(self, x: torch.Tensor, z0=None) -> torch.Tensor:
        return self.head(self.deq(x, z0=z0))

    def head(self, z) -> torch.Tensor:
        """The logits (B, num_classes) of the equilibria z, a tuple of the branches' states."""
        y = self.increase[0](z[0])
        for i, down in enumerate(self.downsample):
            y = self.increase[i + 1](z[i + 1]) + down(y)
        return self.classifier(self.final(y).mean(dim=(2, 3)))
