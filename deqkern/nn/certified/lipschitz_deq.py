"""The 2-norm contractive DEQ: z = act(W z + U x + b) with ||W||_2 <= gamma / Lip(act), gamma < 1, kept by
rescaling with a warm-started power iteration; explicit forward and backward iteration bounds.

Holds the layer `LipschitzDEQ` and its `LipschitzCertificate`.
"""
import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import nn

from ...activations import get_activation
from ...core.api import api_changes
from ...core import validation
from ...lipschitz import spectral_norm, spectral_norm_upper_bound
from ...lipschitz.matrix_norms import warm_gram_steps
from ...lipschitz.carried_bound import carried_square_sum
from ...lipschitz.spectral_bound import SpectralBound, prove_with_vector, proven_spectral_bound
from ...solvers.dense import fixed_point_dense
from ..dense_layer import names_its_inputs
from ._base import CertifiedDEQ
from .bounds import picard_iteration_bound


@dataclass
class LipschitzCertificate:
    """What a LipschitzDEQ guarantees (Euclidean norm throughout), for the weight the layer uses in eval mode.

    weight_spectral_norm: ||W||_2 by power iteration run to convergence (deqkern.lipschitz.spectral_norm), a lower
    bound; weight_norm_bound: a proven upper bound of ||W||_2 (`spectral_norm_upper_bound`), which every figure
    below uses. contraction_factor q = Lip(act) weight_norm_bound (<= gamma by construction, up to rounding):
    z -> act(W z + c) is a q-contraction per sample, and so is the adjoint map h -> act'(u) * (h W + grad_z)
    (|act'| <= Lip(act), ||W^T||_2 = ||W||_2). forward_iterations_bound / backward_iterations_bound:
    `picard_iteration_bound(q, tol)`, the number of evaluations after which each sample of the solve from 0 has
    stopped (exact arithmetic; both solves start at 0). input_lipschitz_bound:
    ||z*(x) - z*(x')||_2 <= Lip(act) injection_norm_bound / (1 - q) ||x - x'||_2 (U's norm bounded likewise).
    """

    gamma: float
    activation: str
    activation_lipschitz: float
    weight_spectral_norm: float
    weight_norm_bound: float
    contraction_factor: float
    tol: float
    forward_iterations_bound: Optional[int]
    backward_tol: float
    backward_iterations_bound: Optional[int]
    within_max_iter: bool
    injection_spectral_norm: float
    injection_norm_bound: float
    input_lipschitz_bound: float
    guarantee: str


# A carried bound that misses the budget by this factor or more is taken as a sign that V moves too fast to carry
CARRY_MISS_FACTOR = 4.0
CARRY_MAX_SKIPS = 63
# The share of proof_budget that a float32 Gram matrix's rounding may cost a training proof's tightness
FLOAT32_GRAM_SHARE = 0.25


class WeightBound(NamedTuple):
    """The proof behind the latest W: weight_norm_bound >= ||W||_2 (at most gamma / Lip(act), up to W's rounding),
    raw_norm_bound >= ||V||_2, how that bound was proven ("cholesky", "squaring", "zero" or "carried": see
    LipschitzDEQ) and its slack above the power-iteration estimate, of which gram_rounding is a float32 Gram matrix's
    rounding bound (0 for a proof in float64)."""

    weight_norm_bound: float
    raw_norm_bound: float
    method: str
    slack: float
    gram_rounding: float = 0.0


class _SpectrallyScaledWeight(torch.autograd.Function):
    """W = V min(1, ratio), ratio = max_norm / sigma_bar, sigma_bar a proven bound of ||V||_2 (no gradient), with the
    gradient of torch's spectral_norm: sigma_bar taken as sigma (sigma_bar / sigma), sigma = ||V u|| with u held
    fixed and the quotient constant, so where the scale s = ratio is active (<= 1)
    dL/dV = s G - s <G, V> / sigma^2 (V u) u^T, and G where it is 1 (or sigma = 0). One node with a one-operation
    forward, in place of a dozen small operations and their backward nodes (at width 64 the operations launched are
    what most of LipschitzDEQ's extra time per step goes to). ratio: a Python float (eager: the branches are taken
    on the host) or a 0-dim tensor (traced)."""

    @staticmethod
    def forward(ctx, V, u, ratio):
        if isinstance(ratio, torch.Tensor):
            ctx.ratio = None
            ctx.save_for_backward(V, u, ratio)
            return V * ratio.clamp(max=1.0)
        ctx.ratio = ratio
        ctx.save_for_backward(V, u)
        return V * min(ratio, 1.0)

    @staticmethod
    def backward(ctx, grad_W):
        if ctx.ratio is not None and ctx.ratio > 1.0 and not torch.is_grad_enabled():  # the scale is 1: W = V (with
            # create_graph the general path below, so that the gradient stays connected to V, as the formula's is)
            return grad_W, None, None
        V, u, *traced = ctx.saved_tensors
        Vu = V @ u
        # the two sums in at least float32: a float16 ||V u||^2 overflows from ||V u|| = 256
        wide = torch.promote_types(V.dtype, torch.float32)
        Vu_wide = Vu.to(wide)
        if not traced and not torch.is_grad_enabled() and V.device.type == "cpu" and \
                not torch.compiler.is_compiling():
            # on the CPU a host read costs less than the half-dozen operations it saves (on a GPU it would wait for
            # the device; compiled autograd traces this backward): the two scalars read at once, the rest on the host
            sigma_sq, inner = torch.stack([Vu_wide @ Vu_wide, torch.dot(grad_W.reshape(-1).to(wide),
                                                                        V.reshape(-1).to(wide))]).tolist()
            scale = min(ctx.ratio, 1.0)
            coefficient = scale * inner / sigma_sq if sigma_sq > 0 else 0.0
            return torch.addr(grad_W * scale, Vu, u, alpha=-coefficient), None, None
        sigma_sq = Vu_wide @ Vu_wide
        positive = sigma_sq > 0
        # the sigma path only where the scale is active (clamp's gradient passes at <= 1) and sigma > 0
        if traced:
            ratio = traced[0]
            active, scale = (ratio <= 1.0) & positive, ratio.clamp(max=1.0)
        else:
            ratio, scale = ctx.ratio, min(ctx.ratio, 1.0)
            active = positive if ratio <= 1.0 else torch.zeros_like(positive)
        sigma_sq = torch.where(positive, sigma_sq, 1.0)
        if torch.is_grad_enabled():  # create_graph: the scale written ratio sigma_d / sigma, its value with its
            # dependence on V, so that a second derivative sees it too
            sigma = sigma_sq.sqrt()
            scale = torch.where(active, ratio * (sigma.detach() / sigma), scale)
        coefficient = torch.where(active, scale * (grad_W.to(wide) * V.to(wide)).sum() / sigma_sq, 0.0)
        return torch.addr(grad_W * scale, Vu, u * coefficient.to(V.dtype), alpha=-1.0), None, None


class LipschitzDEQ(CertifiedDEQ):
    """2-norm contractive implicit layer: x (batch, in) -> z* (batch, hidden), z* = act(z* W^T + x U^T + b).

    W = V min(1, (gamma / Lip(act)) / sigma_bar(V)), sigma_bar a certified upper bound of ||V||_2, so
    ||W||_2 <= gamma / Lip(act) holds for the W of every forward, in training and in eval (up to W's rounding).
    sigma_bar is proven from an estimate (`spectral_norm_upper_bound`: a Cholesky factorisation of sigma_bar^2 I -
    V^T V, or the squaring bound when the estimate is more than 1% low), so the scale is conservative by at most
    that slack (`last_weight_bound` says which). The gradient flows through sigma = ||V u|| with the unit vector u,
    a persistent buffer `power_u`, held fixed (as torch's spectral_norm does).
    Training forward: where V has moved little since the latest training proof V0, that proof is carried:
    sigma_bar(V) = sigma_bar(V0) + ||V - V0||_F is proven too, with no factorisation (O(hidden^2)), and is used
    when it leaves W = V or is within `proof_budget` (relative, default 1e-2; 0: prove at every step where the
    bound matters) of ||V u|| (method "carried": the scale is then conservative by at most that budget), u taking
    `n_power_iterations` warm-started power steps; after attempts that missed the budget by far (V moving fast),
    1, 3, 7, ... steps prove without attempting. Otherwise V is proven anew (the Gram matrix, in float32 for a
    float32 V of at least 224 columns on the CPU with its rounding bound added to the proof while that costs at most
    a quarter of proof_budget, else in float64; an estimate; one Cholesky factorisation in float64 when it proves at
    the first slack tried): the estimate is one block power step and a
    Rayleigh-Ritz projection from the previous proof's Ritz block (Lanczos steps from u for the first proof), and
    its top Ritz vector becomes u. Eval forward: u is the power iteration run to convergence (`power_tol`, default
    1e-10, in float64) from the buffer, left alone, and its estimate is proven as it is; an eval forward for an
    unchanged V reuses its vector and its proof. Call `reset_power_iteration()` after editing `weight_raw` by hand
    (only the estimate's quality depends on it; the bound holds regardless).
    Plain iteration (alpha = 1) from z0 = 0, or method="anderson" (m, beta): the fixed point is unique (a global
    contraction), the certificate's iteration bounds are those of the plain iteration.
    """

    # consecutive far misses of the carried bound, and the attempts left to skip (`_carried_bound`); class-level
    # defaults, so that a layer pickled before they existed loads
    _carry_misses = 0
    _carry_skips = 0
    _float32_gram = False  # whether training proofs form the Gram matrix in float32 (see __init__)

    @api_changes("LipschitzDEQ", old_positional=(
        "gamma", "activation", "tol", "max_iter", "backend", "on_nonconvergence", "backward_tol",
        "backward_max_iter", "n_power_iterations", "power_tol", "power_max_iter", "init_scale", "method", "m",
        "beta", "jac_reg", "on_backward_overflow", "device", "dtype"))
    def __init__(self, in_features: int, hidden_features: int, *, gamma: float = 0.9, activation: str = "tanh",
                 tol: float = 1e-4, max_iter: int = 100, backend: str = "auto", on_nonconvergence: str = "warn",
                 backward_tol: Optional[float] = None, backward_max_iter: Optional[int] = None,
                 n_power_iterations: int = 3, power_tol: Optional[float] = None, power_max_iter: int = 5000,
                 init_scale: float = 1.0, method: str = "picard", m: int = 5, beta: float = 1.0, jac_reg=None,
                 on_backward_overflow: str = "raise", proof_budget: float = 1e-2, device=None, dtype=None):
        act = get_activation(activation)
        validation.check_contraction_factor("LipschitzDEQ", gamma, "Lip(act) ||W||_2")
        if act.lipschitz <= 0:
            raise ValueError(f"deqkern.LipschitzDEQ: activation {activation!r} has no positive Lipschitz constant")
        n_power_iterations = validation.check_int("LipschitzDEQ", "n_power_iterations", n_power_iterations, 1)
        self.proof_budget = validation.check_nonnegative("LipschitzDEQ", "proof_budget", proof_budget)
        super().__init__(in_features, hidden_features, activation, tol, max_iter, backend, on_nonconvergence,
                         backward_tol, backward_max_iter, device, dtype, method=method, m=m, beta=beta,
                         jac_reg=jac_reg, on_backward_overflow=on_backward_overflow)
        self.gamma = float(gamma)
        self.activation_lipschitz = float(act.lipschitz)
        self.max_weight_norm = self.gamma / self.activation_lipschitz
        self.n_power_iterations = n_power_iterations
        self.power_tol = power_tol
        self.power_max_iter = int(power_max_iter)
        self.init_scale = float(init_scale)
        self.register_buffer("power_u", torch.empty(hidden_features, device=device, dtype=dtype))
        self.last_weight: Optional[torch.Tensor] = None  # the W of the latest forward (detached)
        self.last_weight_bound: Optional[WeightBound] = None  # its proof: ||W||_2 <= weight_norm_bound
        self._converged_cache = None
        # (V, sigma_bar(V), its Ritz block, sigma_bar(V) as a float) of the latest training proof: carried forward, and
        # the next proof's start
        self._last_proof = None
        # training proofs of a float32 weight on the CPU form the Gram matrix in float32 (1.8x faster at 512), its
        # rounding bound added to the proof, while that loosens sigma_bar by at most FLOAT32_GRAM_SHARE of
        # proof_budget (0.13% at 512 for a Gaussian V against 0.25%); proof_budget=0 asks for the tightest: float64
        self._float32_gram = self.proof_budget > 0
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        nn.init.normal_(self.weight_raw, std=self.init_scale / math.sqrt(max(1, self.weight_raw.shape[0])))
        u = torch.randn_like(self.power_u)
        self.power_u.copy_(u / u.norm().clamp_min(1e-30))
        self.reset_power_iteration()
        self.injection.reset_parameters()

    @torch.no_grad()
    def reset_power_iteration(self):
        """Runs the power iteration to convergence and stores its vector: call it after changing `weight_raw` by
        hand (a training forward only takes a few warm-started steps). A layer built on the
        meta device has no values to iterate on: the vector is left for `to_empty` and a later call."""
        if self.weight_raw.is_meta:
            return
        self._sigma(self.weight_raw, converged=True, update=True)

    def __getstate__(self):
        """Pickling, torch.save and deepcopy drop the eval-mode cache (recomputed on use)."""
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state["_converged_cache"] = None
        state["_last_proof"] = None
        return state

    def _power_tol(self) -> float:
        return 1e-10 if self.power_tol is None else float(self.power_tol)

    def _sigma(self, V: torch.Tensor, converged: bool, update: bool):
        """(u, sigma_bar): u the unit power-iteration vector, through which the scale's gradient flows (sigma = ||V
        u||_2 with u held fixed, a lower bound of ||V||_2, equal to it once u is a top right singular vector), and
        sigma_bar, a certified upper bound of ||V||_2 (a SpectralBound; float64, no grad), proven for this V (eval:
        reused for an unchanged V)."""
        if torch.compiler.is_compiling():  # traced: the proof as one opaque op, no cache (its test reads the host)
            with torch.no_grad():
                u = self._power_vector(V, converged)
                value, u = proven_spectral_bound(V.detach(), u, not converged)
                if update:
                    self.power_u.copy_(u)
            return u, SpectralBound(value, "cholesky or squaring", math.nan, None)
        with torch.no_grad():
            cache = self._converged_cache
            if (converged and cache is not None and cache[0].shape == V.shape and cache[0].dtype == V.dtype
                    and cache[0].device == V.device and torch.equal(cache[0], V.detach())):
                # repeated eval calls of an unchanged V reuse its vector and its proof: unchanged by content (one
                # comparison), not by version counters, which a write through .data does not bump
                u, bound = cache[1], cache[2]
            elif converged:  # eval: a converged vector's estimate is proven as it is, with no Lanczos steps
                bound, u = prove_with_vector(V, self._power_vector(V, True), refine=False)
                if not update:
                    self._converged_cache = (V.detach().clone(), u, bound)
            else:
                # training: the latest proof carried where V moved little since, with n_power_iterations warm steps
                # for the gradient's vector; else a new proof, whose estimate (one step of the previous proof's Ritz
                # block, or Lanczos) gives the vector instead: warm power steps alone are 1e-4 to 1e-2 low under
                # Adam's steps (measured), and a proof's Ritz vector is sharper than they would be
                bound = self._carried_bound(V, self.power_u)
                if bound is not None:
                    u = self._power_vector(V, False)
                else:
                    bound, u = prove_with_vector(V, self.power_u, refine=True, block=self._ritz_block(V),
                                                 float32_gram=self._float32_gram)
                    if bound.gram_rounding > FLOAT32_GRAM_SHARE * self.proof_budget:
                        self._float32_gram = False  # too loose for this layer's budget: float64 from now on
                    self._last_proof = (V.detach().clone(), bound.value, bound.ritz_block, bound.value.item())
            if update:
                self.power_u.copy_(u)
        return u, bound

    def _last_proof_for(self, V):
        """The latest training proof (V0, sigma_bar(V0), its Ritz block, sigma_bar(V0) as a float) where it can
        serve V (the same shape, dtype and device), else None."""
        previous = self._last_proof
        if previous is None or previous[0].shape != V.shape or previous[0].dtype != V.dtype or \
                previous[0].device != V.device:
            return None
        return previous

    def _ritz_block(self, V) -> Optional[torch.Tensor]:
        """The start of a training proof's estimate: the previous proof's Ritz block (RITZ_BLOCK vectors; the proof
        checks that it fits), warm across steps as the power vector is; None (Lanczos or the exact eigenpair from
        the power vector, which gives the first block) for the first proof."""
        previous = self._last_proof_for(V)
        return None if previous is None else previous[2]

    def _carried_bound(self, V, u) -> Optional[SpectralBound]:
        """The latest training proof carried to V (`carried_spectral_bound`: sigma_bar(V0) + ||V - V0||_F) where
        that is as good as a new proof: it leaves W = V (the bound is within max_weight_norm, so the scale is 1 with
        any proof), or it is within `proof_budget` of ||V u||, a lower bound of ||V||_2, so the scale is
        conservative by at most that; else None (prove again). One host read."""
        previous = self._last_proof_for(V)
        if previous is None:
            return None
        if self._carry_skips > 0:  # the latest attempts missed the budget by far: prove without trying
            self._carry_skips -= 1
            return None
        V = V.detach()
        square_sum, rounding = carried_square_sum(V, previous[0])
        # ||V u|| decides only whether the carried bound is tight enough, not whether it is a bound: V's dtype will do
        estimate = torch.linalg.vector_norm(V @ u.to(V.dtype), dtype=torch.float64)
        square_value, estimate_value = torch.stack([square_sum, estimate]).tolist()
        # carried_spectral_bound's arithmetic on the host's floats (the same float64 operations)
        carried_value = rounding.bound(square_value, previous[3])
        # NaN (a weight gone non-finite) accepts nothing: a new proof then raises
        accepted = carried_value <= self.max_weight_norm or carried_value <= estimate_value * (1.0 + self.proof_budget)
        slack = carried_value / estimate_value - 1.0 if estimate_value > 0 else math.inf
        if accepted:
            self._carry_misses = 0
            carried = torch.tensor(carried_value, dtype=torch.float64, device=V.device)
            return SpectralBound(carried, "carried", slack, None)
        # a miss by more than CARRY_MISS_FACTOR budgets means that one optimiser step moves V beyond the budget (wide
        # layers under Adam: measured 7% of ||V||_2 per step at 512): skip 1, 3, 7, ... attempts (at most
        # CARRY_MAX_SKIPS) before the next, each attempt costing a difference of V and its dot product; a narrow
        # miss keeps trying at every step. Only a cost: a proof is valid whenever it is made
        if not slack <= CARRY_MISS_FACTOR * self.proof_budget:
            self._carry_misses += 1
            self._carry_skips = min(2 ** self._carry_misses - 1, CARRY_MAX_SKIPS)
        return None

    def _power_vector(self, V, converged):
        """The unit power-iteration vector for V: converged (float64, power_tol) or n_power_iterations warm-started
        steps; the previous vector where V = 0 or an overflow leaves none."""
        backend = self.solver_options["backend"]
        if converged:  # in float64 to power_tol (warns deqkern.lipschitz.PowerIterationWarning if not)
            u = spectral_norm(V.detach().double(), max_iter=self.power_max_iter, tol=self._power_tol(),
                              u0=self.power_u.double(), backend=backend).u.to(V.dtype)
        else:  # a fixed number of warm-started steps: tol below reach, no check
            u = warm_gram_steps(V.detach(), self.power_u, self.n_power_iterations, backend)
            if u.device.type == "cpu" and not torch.compiler.is_compiling():
                # checked on the host, 3 operations where the tensors' test is 13 (on a GPU the read would wait)
                norm = torch.linalg.vector_norm(u).item()
                return u / norm if math.isfinite(norm) and norm > 0 else self.power_u.clone()
        norm = u.norm()
        usable = torch.isfinite(norm) & (norm > 0)
        return torch.where(usable, u / torch.where(usable, norm, torch.ones_like(norm)), self.power_u)

    def compute_weight(self, converged: bool = True, update: bool = False) -> torch.Tensor:
        """W = V min(1, (gamma / Lip(act)) / sigma_bar(V)) (differentiable), sigma_bar a certified upper bound of
        ||V||_2, so ||W||_2 <= gamma / Lip(act) for every V, however few power steps were taken. The gradient is
        that of torch's spectral_norm (through sigma = ||V u|| with u held fixed): sigma_bar enters as
        sigma * (sigma_bar / sigma), the ratio held constant. Stores the proof in `last_weight_bound`."""
        V = self.weight_raw
        u, bound = self._sigma(V, converged, update)
        if u is self.power_u:  # the autograd node keeps u: not the buffer, which the next forward overwrites
            u = u.clone()
        # sigma_bar rounded up by 4 eps of V's dtype: W = V * scale must not exceed the bound by the scale's and W's
        # own roundings either
        eps, tiny = torch.finfo(V.dtype).eps, torch.finfo(V.dtype).tiny
        if torch.compiler.is_compiling():  # the bound stays a tensor (its floats would read the host)
            ratio = self.max_weight_norm / (bound.value * (1.0 + 4.0 * eps)).to(V.dtype).clamp_min(tiny)
        else:
            raw = bound.value.item()
            ratio = self.max_weight_norm / max(raw * (1.0 + 4.0 * eps), tiny)
            self.last_weight_bound = WeightBound(min(raw, self.max_weight_norm * (1 + 8 * eps)), raw, bound.method,
                                                 bound.slack, bound.gram_rounding)
        return _SpectrallyScaledWeight.apply(V, u, ratio)

    @property
    def weight(self) -> torch.Tensor:
        """The weight of the eval-mode forward (converged power iteration); does not touch the buffer."""
        return self.compute_weight(converged=True, update=False)

    @names_its_inputs
    def forward(self, x: torch.Tensor, z0: Optional[torch.Tensor] = None) -> torch.Tensor:
        W = self.compute_weight(converged=not self.training, update=self.training)
        self.last_weight = W.detach()
        c, z0 = self.in_weight_dtype(W, self.injection_values(x), z0)
        z, self.last_info = fixed_point_dense(W, c, z0=z0, jacobian_penalty=self.jacobian_penalty_weight(),
                                              **self.solver_options)
        return z

    @torch.no_grad()
    def certificate(self) -> LipschitzCertificate:
        W = self.weight.double()
        backend = self.solver_options["backend"]
        w_norm = spectral_norm(W, max_iter=self.power_max_iter, tol=1e-13, u0=self.power_u.double(),
                               backend=backend).value
        U = self.injection.weight.double()
        u_norm = spectral_norm(U, max_iter=self.power_max_iter, tol=1e-13, backend=backend).value
        # the certificate uses proven upper bounds of both norms, not the power iteration's lower bounds
        w_bound = float(spectral_norm_upper_bound(W, w_norm).value)
        u_bound = float(spectral_norm_upper_bound(U, u_norm).value)
        w_norm, u_norm = float(w_norm), float(u_norm)
        q = self.activation_lipschitz * w_bound
        opts = self.solver_options
        tol, max_iter = opts["tol"], opts["max_iter"]
        btol = tol if opts["backward_tol"] is None else opts["backward_tol"]
        bmax = max_iter if opts["backward_max_iter"] is None else opts["backward_max_iter"]
        fwd, bwd = picard_iteration_bound(q, tol), picard_iteration_bound(q, btol)
        within = fwd is not None and bwd is not None and fwd <= max_iter and bwd <= bmax
        lip_bound = self.activation_lipschitz * u_bound / (1 - q) if q < 1 else math.inf
        return LipschitzCertificate(
            gamma=self.gamma, activation=self.activation, activation_lipschitz=self.activation_lipschitz,
            weight_spectral_norm=w_norm, weight_norm_bound=w_bound, contraction_factor=q, tol=tol,
            forward_iterations_bound=fwd, backward_tol=btol, backward_iterations_bound=bwd, within_max_iter=within,
            injection_spectral_norm=u_norm, injection_norm_bound=u_bound, input_lipschitz_bound=lip_bound,
            guarantee=(f"q = Lip(act) ||W||_2 = {q:.6g} < 1: unique fixed point, the plain iteration from 0 stops "
                       f"within {fwd} evaluations at tol={tol:g} and the implicit backward within {bwd} at "
                       f"tol={btol:g} (exact arithmetic); ||z*(x) - z*(x')||_2 <= {lip_bound:.6g} ||x - x'||_2")
            if q < 1 else f"q = Lip(act) ||W||_2 = {q:.6g} >= 1: nothing is certified",
        )

    def extra_repr(self) -> str:
        return (f"in_features={self.injection.in_features}, hidden_features={self.weight_raw.shape[0]}, "
                f"gamma={self.gamma}, activation={self.activation!r}")

