"""The 2-norm contractive DEQ: z = act(W z + U x + b) with ||W||_2 <= gamma / Lip(act), gamma < 1, kept by
rescaling with a warm-started power iteration; explicit forward and backward iteration bounds.

Holds the layer `LipschitzDEQ` and its `LipschitzCertificate`.
"""
import math
import weakref
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..activations import get_activation
from ..core import validation
from ..lipschitz import power_iteration, spectral_norm
from ..ops.fixed_point_dense import fixed_point_dense
from ._base import CertifiedDEQ
from .bounds import picard_iteration_bound


@dataclass
class LipschitzCertificate:
    """What a LipschitzDEQ guarantees (Euclidean norm throughout), for the weight the layer uses in eval mode.

    weight_spectral_norm: ||W||_2 by power iteration run to convergence (deqkern.lipschitz.spectral_norm);
    contraction_factor q = Lip(act) ||W||_2 (<= gamma by construction): z -> act(W z + c) is a q-contraction per
    sample, and so is the adjoint map h -> act'(u) * (h W + grad_z) (|act'| <= Lip(act), ||W^T||_2 = ||W||_2).
    forward_iterations_bound / backward_iterations_bound: `picard_iteration_bound(q, tol)`, the number of
    evaluations after which each sample of the solve from 0 has stopped (exact arithmetic; both solves start at 0).
    input_lipschitz_bound: ||z*(x) - z*(x')||_2 <= Lip(act) ||U||_2 / (1 - q) ||x - x'||_2.
    """

    gamma: float
    activation: str
    activation_lipschitz: float
    weight_spectral_norm: float
    contraction_factor: float
    tol: float
    forward_iterations_bound: Optional[int]
    backward_tol: float
    backward_iterations_bound: Optional[int]
    within_max_iter: bool
    injection_spectral_norm: float
    input_lipschitz_bound: float
    guarantee: str


class LipschitzDEQ(CertifiedDEQ):
    """2-norm contractive implicit layer: x (batch, in) -> z* (batch, hidden), z* = act(z* W^T + x U^T + b).

    W = V min(1, (gamma / Lip(act)) / sigma(V)), sigma(V) the largest singular value by power iteration
    (deqkern.lipschitz.spectral_norm) from a persistent vector `power_u` (a buffer): in training mode each forward
    runs `n_power_iterations` steps from it and stores the result (as torch's spectral_norm does; the gradient flows
    through sigma with the vector held fixed); in eval mode the iteration runs to convergence (`power_tol`) and the
    buffer is left alone, so the eval forward uses ||W||_2 <= gamma / Lip(act) up to that tolerance (the converged
    iteration runs in float64, default power_tol 1e-10). Call `reset_power_iteration()` after editing `weight_raw`
    by hand.
    Plain iteration (alpha = 1) from z0 = 0.
    """

    def __init__(self, in_features: int, hidden_features: int, gamma: float = 0.9, activation: str = "tanh",
                 tol: float = 1e-4, max_iter: int = 100, backend: str = "auto", on_nonconvergence: str = "warn",
                 backward_tol: Optional[float] = None, backward_max_iter: Optional[int] = None,
                 n_power_iterations: int = 3, power_tol: Optional[float] = None, power_max_iter: int = 5000,
                 init_scale: float = 1.0, device=None, dtype=None):
        act = get_activation(activation)
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not (0 < gamma < 1):
            raise ValueError(f"gamma must be a number in (0, 1) (the contraction factor Lip(act) ||W||_2 the layer "
                             f"is kept below), got {gamma!r}")
        if act.lipschitz <= 0:
            raise ValueError(f"activation {activation!r} has no positive Lipschitz constant")
        n_power_iterations = validation.check_int("LipschitzDEQ", "n_power_iterations", n_power_iterations, 1)
        super().__init__(in_features, hidden_features, activation, tol, max_iter, backend, on_nonconvergence,
                         backward_tol, backward_max_iter, device, dtype)
        self.gamma = float(gamma)
        self.activation_lipschitz = float(act.lipschitz)
        self.max_weight_norm = self.gamma / self.activation_lipschitz
        self.n_power_iterations = n_power_iterations
        self.power_tol = power_tol
        self.power_max_iter = int(power_max_iter)
        self.init_scale = float(init_scale)
        self.register_buffer("power_u", torch.empty(hidden_features, device=device, dtype=dtype))
        self.last_weight: Optional[torch.Tensor] = None  # the W of the latest forward (detached)
        self._converged_cache = None
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
        hand (the training-mode forward only takes `n_power_iterations` warm-started steps). A layer built on the
        meta device has no values to iterate on: the vector is left for `to_empty` and a later call."""
        if self.weight_raw.is_meta:
            return
        self._sigma(self.weight_raw, converged=True, update=True)

    def __getstate__(self):
        """Pickling, torch.save and deepcopy drop the converged power-iteration cache (weak references)."""
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state["_converged_cache"] = None
        return state

    def _power_tol(self) -> float:
        return 1e-10 if self.power_tol is None else float(self.power_tol)

    def _sigma(self, V: torch.Tensor, converged: bool, update: bool) -> torch.Tensor:
        """sigma(V) = ||V u||_2 at the power-iteration vector u, differentiable in V with u held fixed (a lower
        bound of ||V||_2, equal to it once u is a top right singular vector)."""
        backend = self.solver_options["backend"]
        with torch.no_grad():
            if converged:  # in float64 to power_tol (warns deqkern.lipschitz.PowerIterationWarning if not reached)
                # cached while neither V nor the buffer changes (repeated eval calls run no power iteration)
                # (weak references: a new tensor that reuses a freed one's memory never matches)
                key = (V._version, self.power_u._version)
                cache = self._converged_cache
                if cache is not None and cache[0]() is V and cache[1]() is self.power_u and cache[2] == key:
                    u = cache[3]
                else:
                    u = spectral_norm(V.detach().double(), n_iter=self.power_max_iter, tol=self._power_tol(),
                                      u0=self.power_u.double(), backend=backend).u.to(V.dtype)
            else:  # a fixed number of warm-started steps: tol below reach, no check, no host synchronisation
                u = power_iteration(V.detach(), self.power_u[None], mode="gram", max_iter=self.n_power_iterations,
                                    tol=1e-300, backend=backend, on_nonconvergence="ignore").u[0]
            norm = u.norm()
            usable = torch.isfinite(norm) & (norm > 0)  # V = 0 (or an overflow): keep the previous vector
            u = torch.where(usable, u / torch.where(usable, norm, torch.ones_like(norm)), self.power_u)
            if converged and not update:
                self._converged_cache = (weakref.ref(V), weakref.ref(self.power_u), key, u)
            if update:
                self.power_u.copy_(u)
        return torch.linalg.vector_norm(V @ u)

    def compute_weight(self, converged: bool = True, update: bool = False) -> torch.Tensor:
        """W = V min(1, (gamma / Lip(act)) / sigma(V)) (differentiable)."""
        V = self.weight_raw
        sigma = self._sigma(V, converged, update)
        scale = torch.clamp(self.max_weight_norm / sigma.clamp_min(torch.finfo(V.dtype).tiny), max=1.0)
        return V * scale

    @property
    def weight(self) -> torch.Tensor:
        """The weight of the eval-mode forward (converged power iteration); does not touch the buffer."""
        return self.compute_weight(converged=True, update=False)

    def forward(self, x: torch.Tensor, z0: Optional[torch.Tensor] = None) -> torch.Tensor:
        W = self.compute_weight(converged=not self.training, update=self.training)
        self.last_weight = W.detach()
        z, self.last_info = fixed_point_dense(W, self.injection(x), z0=z0, **self.solver_options)
        return z

    @torch.no_grad()
    def certificate(self) -> LipschitzCertificate:
        W = self.weight.double()
        backend = self.solver_options["backend"]
        w_norm = float(spectral_norm(W, n_iter=self.power_max_iter, tol=1e-13, u0=self.power_u.double(),
                                     backend=backend).value)
        u_norm = float(spectral_norm(self.injection.weight.double(), n_iter=self.power_max_iter, tol=1e-13,
                                     backend=backend).value)
        q = self.activation_lipschitz * w_norm
        opts = self.solver_options
        tol, max_iter = opts["tol"], opts["max_iter"]
        btol = tol if opts["backward_tol"] is None else opts["backward_tol"]
        bmax = max_iter if opts["backward_max_iter"] is None else opts["backward_max_iter"]
        fwd, bwd = picard_iteration_bound(q, tol), picard_iteration_bound(q, btol)
        within = fwd is not None and bwd is not None and fwd <= max_iter and bwd <= bmax
        lip_bound = self.activation_lipschitz * u_norm / (1 - q) if q < 1 else math.inf
        return LipschitzCertificate(
            gamma=self.gamma, activation=self.activation, activation_lipschitz=self.activation_lipschitz,
            weight_spectral_norm=w_norm, contraction_factor=q, tol=tol, forward_iterations_bound=fwd,
            backward_tol=btol, backward_iterations_bound=bwd, within_max_iter=within, injection_spectral_norm=u_norm,
            input_lipschitz_bound=lip_bound,
            guarantee=(f"q = Lip(act) ||W||_2 = {q:.6g} < 1: unique fixed point, the plain iteration from 0 stops "
                       f"within {fwd} evaluations at tol={tol:g} and the implicit backward within {bwd} at "
                       f"tol={btol:g} (exact arithmetic); ||z*(x) - z*(x')||_2 <= {lip_bound:.6g} ||x - x'||_2")
            if q < 1 else f"q = Lip(act) ||W||_2 = {q:.6g} >= 1: nothing is certified",
        )

    def extra_repr(self) -> str:
        return (f"in_features={self.injection.in_features}, hidden_features={self.weight_raw.shape[0]}, "
                f"gamma={self.gamma}, activation={self.activation!r}")

