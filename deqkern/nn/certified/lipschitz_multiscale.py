"""LipschitzMultiscaleDEQ: the Lipschitz multiscale DEQ (Sato and Iiduka, AISTATS 2026) whose contraction is proven
at every forward, and its classifier; the cell and the bound are in lipschitz_multiscale_cell.py."""
import inspect
import math
from dataclasses import dataclass
from typing import Dict, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn

from ...core import validation
from ...core.api import api_changes
from ...lipschitz import conv_operator_norm_upper_bound
from ...solvers.generic import solve
from ..deq import DEQ
from ..multiscale import MultiscaleDEQClassifier, MultiscaleLayer
from .bounds import picard_iteration_bound
from .conv._base import _check_spatial
from .lipschitz_multiscale_cell import BOUNDS, LipschitzMultiscaleCell, MeanOnlyGroupNorm

# deqkern.solve's defaults, which nn.DEQ's forward solve uses for what solver_options leave unset
_SOLVE_DEFAULTS = {name: inspect.signature(solve).parameters[name].default for name in ("tol", "max_iter")}


class MultiscaleBound(NamedTuple):
    """The bound behind the latest forward's map, on its input's (H, W): lipschitz_bound = scale * unscaled_bound
    (<= gamma), unscaled_bound the bound of the map before the post-fusion kernels were multiplied by scale."""

    lipschitz_bound: float
    unscaled_bound: float
    scale: float
    input_shape: Tuple[int, int]


@dataclass
class LipschitzMultiscaleCertificate:
    """What a LipschitzMultiscaleDEQ guarantees on inputs of spatial shape input_shape = (H, W), in the l2 norm of
    a sample's whole state (all branches), for the kernels of every forward on that shape.

    lipschitz_bound: the proven bound L of z -> f(z, x), recomputed in float64 from the forward's own kernels as
    rounded in their dtype (every convolution by lipschitz.conv_operator_norm_upper_bound): the proof, where
    `last_bound` is the forward's figure for the exact products before rounding; paper_estimate: the same
    composition with the paper's per-convolution estimate (one power step on the kernel reshaped to a matrix,
    warm-started across training forwards), and paper_estimate_ratio = paper_estimate / lipschitz_bound.
    forward_iterations_bound / backward_iterations_bound: `picard_iteration_bound(L, tol)`, the evaluations after
    which every sample of a Picard solve from 0 (method="picard") has stopped, in exact arithmetic. anderson: what
    the bound says of an Anderson solve. input_lipschitz_bound: ||z*(x) - z*(x')|| <= it ||x - x'||
    (injection_norm_bound: a proven bound of the injection conv's norm). conv_norm_bounds / conv_paper_estimates:
    per convolution.
    """

    gamma: float
    bound: str
    input_shape: Tuple[int, int]
    lipschitz_bound: float
    paper_estimate: float
    paper_estimate_ratio: float
    scale: float
    tol: float
    forward_iterations_bound: Optional[int]
    backward_tol: float
    backward_iterations_bound: Optional[int]
    within_max_iter: bool
    anderson: str
    injection_norm_bound: float
    input_lipschitz_bound: float
    conv_norm_bounds: Dict[str, float]
    conv_paper_estimates: Dict[str, float]
    guarantee: str


class LipschitzMultiscaleDEQ(MultiscaleLayer):
    """Lipschitz multiscale DEQ: x (B, in_channels, H, W) -> the equilibrium of every branch, a tuple of n tensors
    (B, channels[i], H / 2^i, W / 2^i), H and W divisible by 2^(n - 1); z -> f(z, x) is a gamma-contraction in the
    l2 norm of the whole state, proven at every forward (training and eval) on the forward's own (H, W).

    The cell (lipschitz_multiscale_cell.py): the paper's ReLU of slope `slope`, mean-only GroupNorm, residual
    (1 - alpha) z + alpha F(z), fusion weighted by beta with softmax weights over the other branches; its
    convolutions projected at each forward to operator norm <= conv_norm_max by a proven bound (not the paper's
    reshaped-kernel power step, which underestimates it), then the post-fusion kernels scaled so that the composed
    bound L <= gamma. bound="paper" uses the paper's estimate instead: the same cell with nothing proven (for
    comparison). The injection: conv3x3 -> mean-only GroupNorm -> ReLU into the first branch. dropout: variational
    dropout after each block's second conv (one mask per solve, training only; counted in the bound).
    method, backward, solver_options, backward_options, phantom_steps, phantom_damping, jac_reg: those of `nn.DEQ`
    (Anderson forward and backward by default, as in the paper). `last_bound`: the latest forward's bound;
    `certificate()`: what is guaranteed.
    """

    @api_changes("LipschitzMultiscaleDEQ")
    def __init__(self, in_channels: int, channels: Sequence[int] = (8, 16), *, expansion: int = 5, groups: int = 4,
                 dropout: float = 0.0, gamma: float = 0.9, slope: float = 0.4, alpha: float = 0.5, beta: float = 0.3,
                 conv_norm_max: float = 2.0, bound: str = "proven", method: str = "anderson", backward: str = "ift",
                 solver_options: Optional[dict] = None, backward_options: Optional[dict] = None,
                 phantom_steps: int = 5, phantom_damping: float = 0.8, jac_reg=None, device=None, dtype=None):
        super().__init__()
        what = "LipschitzMultiscaleDEQ"
        self._init_branches(what, in_channels, channels, expansion, groups, dropout)
        self.gamma = validation.check_contraction_factor(what, gamma, "Lip(z -> f(z, x))")
        self.slope = validation.check_unit_interval(what, "slope", slope)  # above 1 the ReLU expands
        self.alpha = validation.check_unit_interval(what, "alpha", alpha)
        self.beta = validation.check_fraction(what, "beta", beta)  # the fusion's weight of the other branches
        self.conv_norm_max = validation.check_positive(what, "conv_norm_max", conv_norm_max)
        self.bound = validation.check_choice(what, "bound", bound, BOUNDS)
        factory = {"device": device, "dtype": dtype}
        self.injection = nn.Sequential(nn.Conv2d(in_channels, self.channels[0], 3, padding=1, bias=False, **factory),
                                       MeanOnlyGroupNorm(groups, self.channels[0], **factory), nn.ReLU())
        self.cell = LipschitzMultiscaleCell(self.channels, expansion, groups, self.slope, self.alpha, self.beta,
                                            self.conv_norm_max, self.dropout, **factory)
        self.deq = DEQ(self.cell, method=method, backward=backward, solver_options=solver_options,
                       backward_options=backward_options, phantom_steps=phantom_steps,
                       phantom_damping=phantom_damping, jac_reg=jac_reg)
        self.last_bound: Optional[MultiscaleBound] = None

    def _cell_inputs(self, x, shapes, masks):
        height, width = x.shape[2], x.shape[3]
        kernels, bound, unscaled, scale, _ = self.cell.certified_kernels(
            height, width, self.gamma, self.bound, update_paper_vectors=self.training and masks)
        self.last_bound = MultiscaleBound(float(bound.detach()), float(unscaled.detach()), float(scale.detach()),
                                          (height, width))
        injection = self.injection(x)
        dropout = self.dropout_masks(shapes, injection) if masks else None
        return (injection, *(dropout if dropout is not None else (None,) * len(self.channels)), *kernels)

    @torch.no_grad()
    def certificate(self, input_shape=None) -> LipschitzMultiscaleCertificate:
        """The certificate for inputs of spatial shape input_shape = (H, W) (default: the latest forward's)."""
        what = "LipschitzMultiscaleDEQ"
        if input_shape is None:
            if self.last_bound is None:
                raise ValueError(f"deqkern.{what}: pass input_shape=(H, W) (no forward has run yet to take it from)")
            input_shape = self.last_bound.input_shape
        height, width = _check_spatial(what, input_shape)
        self._check_resolution(what, height, width)
        cell = self.cell
        kernels, _, _, scale, _ = cell.certified_kernels(height, width, self.gamma, self.bound)
        kernels = {spec.name: k.double() for spec, k in zip(cell.specs, kernels)}
        proven = cell.conv_norms(height, width, "proven", weights=kernels)
        paper = cell.conv_norms(height, width, "paper", weights=kernels)
        lipschitz, input_gain = (float(v) for v in cell.lipschitz_bound(proven))
        paper_estimate = float(cell.lipschitz_bound(paper)[0])
        conv, norm = self.injection[0], self.injection[1]
        injection_bound = float(conv_operator_norm_upper_bound(conv.weight.double(), (self.in_channels, height, width),
                                                               padding=1) * norm.lipschitz())
        forward_options = dict(_SOLVE_DEFAULTS, **self.deq.solver_options)
        backward_options = self.deq.backward_options
        tol, backward_tol = float(forward_options["tol"]), float(backward_options["tol"])
        fwd, bwd = picard_iteration_bound(lipschitz, tol), picard_iteration_bound(lipschitz, backward_tol)
        within = (fwd is not None and bwd is not None and fwd <= forward_options["max_iter"]
                  and bwd <= backward_options["max_iter"])
        contraction = lipschitz < 1
        input_lipschitz = input_gain * injection_bound / (1 - lipschitz) if contraction else math.inf
        anderson = ("the fixed point is unique, so an Anderson solve that converges finds it; the iteration bounds "
                    "are Picard's (method='picard'), not Anderson's" if contraction else "nothing is proven")
        shape = f"{height}x{width}"
        guarantee = (f"on {shape} inputs, Lip(z -> f(z, x)) <= {lipschitz:.6g} < 1 in the l2 norm of the whole state "
                     f"(composed from proven operator-norm bounds of every convolution): unique fixed point, the "
                     f"Picard iteration from 0 stops within {fwd} evaluations at tol={tol:g} and its implicit backward "
                     f"within {bwd} at tol={backward_tol:g} (exact arithmetic); ||z*(x) - z*(x')|| <= "
                     f"{input_lipschitz:.6g} ||x - x'||" if contraction else
                     f"on {shape} inputs the proven bound of Lip(z -> f(z, x)) is {lipschitz:.6g}, not < 1: nothing "
                     f"is certified")
        if self.bound == "paper":
            guarantee = (f"bound='paper': the kernels were projected and scaled by the paper's estimates (of the "
                         f"map: {paper_estimate:.6g}), which are no bounds; " + guarantee)
        return LipschitzMultiscaleCertificate(
            gamma=self.gamma, bound=self.bound, input_shape=(height, width), lipschitz_bound=lipschitz,
            paper_estimate=paper_estimate, paper_estimate_ratio=paper_estimate / lipschitz if lipschitz else math.nan,
            scale=float(scale), tol=tol, forward_iterations_bound=fwd, backward_tol=backward_tol,
            backward_iterations_bound=bwd, within_max_iter=within, anderson=anderson,
            injection_norm_bound=injection_bound, input_lipschitz_bound=input_lipschitz,
            conv_norm_bounds={k: float(v) for k, v in proven.items()},
            conv_paper_estimates={k: float(v) for k, v in paper.items()}, guarantee=guarantee)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", gamma={self.gamma}, slope={self.slope}, bound={self.bound!r}"


class LipschitzMultiscaleDEQClassifier(MultiscaleDEQClassifier):
    """x (B, in_channels, H, W) -> logits (B, num_classes): a LipschitzMultiscaleDEQ and MDEQ's classification head
    (see MultiscaleDEQClassifier); every other keyword goes to LipschitzMultiscaleDEQ."""

    DEQ_CLASS = LipschitzMultiscaleDEQ
