"""Generic deep equilibrium module: z* = f(z*, x) for any f, solved by `deqkern.solve`, differentiated by IFT,
phantom gradients or one-step (Jacobian-free) gradients.

Construction of the graph (all three backward modes):

1. Forward solve, without building a graph (`torch.no_grad`): z* = deqkern.solve(lambda z: f(z, x), z0, ...).
2. When autograd needs the output (grad mode on and x or a parameter of f requires grad; train *and* eval mode):

   - ``"ift"``: z = f(z*, x) once with grad (z* a constant), then an identity autograd.Function on z whose backward
     replaces the incoming gradient ``v`` by the solution g of the adjoint equation g = J^T g + v, J = df/dz at z*
     (vector-Jacobian products by torch.autograd.grad on a fresh evaluation f(z*, x)), solved with deqkern.solve
     and `backward_options`. Autograd then carries g through z = f(z*, x) to the parameters of f and to x:
     dL/dtheta = g^T df/dtheta, dL/dx = g^T df/dx, which is the implicit-function-theorem gradient.
   - ``"phantom"``: k damped unrolled steps with grad from z*: z <- (1 - tau) z + tau f(z, x).
   - ``"one_step"``: z = f(z*.detach(), x) (Jacobian-free backpropagation).

   When autograd does not need the output, z* is returned as is (no extra evaluation of f).

Second derivatives: with create_graph=True the IFT backward is itself differentiated implicitly
(nn/implicit_backward.py); phantom and one-step gradients are differentiated as the unrolled steps they are.
"""
from typing import Callable, Optional

import torch
from torch import nn

from ..core import validation
from ..core.api import api_changes
from ..core.constants import SOLVE_METHODS
from ..core.info import SolverInfo
from ..core.policy import caller_inputs, check_policy
from ..jacobian.regularization import jacobian_reg
from ..solvers.generic import SOLVE_OPTIONS, solve
from ..solvers.state import StateLayout, is_structured
from .dense_layer import add_penalty_gradient, parse_jac_reg
from .implicit_backward import AutocastState, ImplicitCall, implicit_solution, input_tensors, module_parameters
from .implicit_backward import replace_input_tensors

BACKWARD_MODES = ("ift", "phantom", "one_step")
DEFAULT_BACKWARD_OPTIONS = dict(method="anderson", tol=1e-6, max_iter=100)
WHAT = "nn.DEQ"


def _check_options(options, what):
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise TypeError(f"{what} must be a dict, got {type(options).__name__}")
    options = dict(options)
    if "solver" in options:
        raise TypeError(f"deqkern.{WHAT}: {what}['solver'] is now spelled {what}['method'] (renamed in deqkern 0.2.0)")
    keys = SOLVE_OPTIONS | ({"method"} if what == "backward_options" else set())
    unknown = sorted(set(options) - keys)
    if unknown:
        raise TypeError(f"deqkern.{WHAT}: unknown {what} key(s) {unknown}; valid keys: {sorted(keys)}")
    check_policy(WHAT, options.get("on_nonconvergence", "warn"), name=f"{what}['on_nonconvergence']")
    validation.check_positive(WHAT, f"{what}['tol']", options.get("tol", 1e-4))
    validation.check_int(WHAT, f"{what}['max_iter']", options.get("max_iter", 1), 1)
    if "method" in options:
        validation.check_choice(WHAT, f"{what}['method']", options["method"], SOLVE_METHODS)
    return options


_STATE_HINT = "pass z0=... to forward or z_shape=... to DEQ to set the state's shape"


def _add_state_note(exc, z, guessed, layout=None):
    """Adds (Python >= 3.11) which state f was called on to an exception raised inside f."""
    what = f"a state z of shape {tuple(z.shape)}" if layout is None else f"a state z that is a {layout.describe()}"
    z = z if layout is None else z[0]
    note = (f"deqkern.{WHAT}: raised by f(z, x) on {what}, dtype {z.dtype}, device {z.device}"
            + (f" (the default state zeros_like(x): {_STATE_HINT})" if guessed else ""))
    if hasattr(exc, "add_note"):
        exc.add_note(note)


def _check_map_output(out, z, guessed):
    """f(z, x) must return a tensor of z's shape, dtype and device: checked at every evaluation (metadata only, no
    synchronisation), so an f that changes its output later is caught when it does."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"deqkern.{WHAT}: f(z, x) must return a torch.Tensor, got {type(out).__name__}")
    if out.shape != z.shape:
        raise ValueError(f"deqkern.{WHAT}: f(z, x) returned shape {tuple(out.shape)} for z of shape {tuple(z.shape)}; "
                         f"f must map z to z's shape" + (f" ({_STATE_HINT})" if guessed else ""))
    if out.dtype != z.dtype or out.device != z.device:
        raise TypeError(f"deqkern.{WHAT}: f(z, x) returned {out.dtype} on {out.device} for a state z of {z.dtype} on "
                        f"{z.device}: f must keep the state's dtype and device (the default state has x's; pass z0=... "
                        "to set them)")


def _checked_start(state, name):
    """A start state: a tensor, or a tuple or list (checked where it is packed, by StateLayout.of)."""
    if not is_structured(state) and not isinstance(state, torch.Tensor):
        raise TypeError(f"deqkern.{WHAT}: {name} must be a torch.Tensor or a tuple or list of them, got "
                        f"{type(state).__name__}")
    return state


def _inputs_detached(x):
    """x for the solves, which need no graph to it: a tensor detached, or the tensors of a tuple or list (other items,
    such as None or a function, kept as they are)."""
    if isinstance(x, torch.Tensor):
        return x.detach()
    if is_structured(x):
        return type(x)(t.detach() if isinstance(t, torch.Tensor) else t for t in x)
    return x


def _is_shape_list(z_shape):
    """z_shape is a sequence of per-sample shapes (a tuple state), not one shape."""
    return (isinstance(z_shape, (tuple, list)) and len(z_shape) > 0
            and all(isinstance(shape, (tuple, list, torch.Size)) for shape in z_shape))


class DEQ(nn.Module):
    """Deep equilibrium layer z* = f(z*, x) around any `f(z, x) -> z` (an nn.Module or a callable): forward(x, z0=None)
    returns z* (B, ...); the forward solve's SolverInfo is `last_info` (its `backward` filled once the IFT adjoint
    solve has run).

    method: the forward solve of deqkern.solve ("anderson", "picard" or "broyden"); solver_options: its other
    keywords (tol, max_iter, m, beta, alpha, lam, check_every, return_trace, on_nonconvergence, backend,
    process_group). backward: "ift" (implicit function theorem; backward_options: the adjoint solve's "method" and
    the same keys, defaults method="anderson", tol=1e-6, max_iter=100), "phantom" (phantom_steps damped unrolled
    steps, phantom_damping) or "one_step". jac_reg: w or (w, probability), the Hutchinson Jacobian penalty's
    gradient added in training. z_shape: per-sample shape of the default z0 = zeros(B, *z_shape) (or a callable
    x -> z0); without it and without z0, z0 = zeros_like(x). Gradients are built whenever autograd needs them, in
    eval mode too. Unknown options raise TypeError at construction. Details: docs/api.md.
    """

    @api_changes(WHAT, renamed={"solver": "method"}, old_positional=("method", "backward", "solver_options",
                 "backward_options", "phantom_steps", "phantom_damping", "z_shape", "jac_reg"))
    def __init__(
        self,
        f: Callable,
        *,
        method: str = "anderson",
        backward: str = "ift",
        solver_options: Optional[dict] = None,
        backward_options: Optional[dict] = None,
        phantom_steps: int = 5,
        phantom_damping: float = 0.8,
        z_shape=None,
        jac_reg=None,
    ):
        super().__init__()
        if not callable(f):
            raise TypeError(f"deqkern.{WHAT}: f must be callable (an nn.Module or a function f(z, x)), got "
                            f"{type(f).__name__}")
        validation.check_choice(WHAT, "method", method, SOLVE_METHODS)
        validation.check_choice(WHAT, "backward", backward, BACKWARD_MODES)
        self.f = f  # an nn.Module is registered as a submodule by nn.Module.__setattr__
        self.method = method
        self.backward_mode = backward
        self.solver_options = _check_options(solver_options, "solver_options")
        if "method" in self.solver_options:
            raise TypeError(f"deqkern.{WHAT}: pass the forward method as method=..., not in solver_options")
        bwd = dict(DEFAULT_BACKWARD_OPTIONS)
        bwd.update(_check_options(backward_options, "backward_options"))
        self.backward_options = bwd
        validation.check_int(WHAT, "phantom_steps", phantom_steps, 1)
        self.phantom_steps = phantom_steps
        self.phantom_damping = validation.check_unit_interval(WHAT, "phantom_damping", phantom_damping)
        self.z_shape = z_shape
        self.jac_reg_weight, self.jac_reg_probability = parse_jac_reg(WHAT, jac_reg)
        self.last_jac_loss: Optional[torch.Tensor] = None
        self.last_info: Optional[SolverInfo] = None
        self.last_backward_info: Optional[SolverInfo] = None

    # ------------------------------------------------------------------ helpers
    def _initial(self, x, z0):
        """The start: z0 (a tensor, or a tuple or list of them), else zeros of z_shape (one per-sample shape, or a
        sequence of them for a tuple state) or from the callable z_shape, else zeros_like(x) (of each tensor of a
        tuple or list x)."""
        if z0 is not None:
            return _checked_start(z0, "z0")
        if callable(self.z_shape):
            return _checked_start(self.z_shape(x), "z_shape(x)")
        tensors = [t for t in (x if is_structured(x) else (x,)) if isinstance(t, torch.Tensor)]
        if self.z_shape is None:
            if is_structured(x) and len(tensors) == len(x):
                return type(x)(torch.zeros_like(t) for t in x)
            if isinstance(x, torch.Tensor):
                if x.dim() < 2:
                    raise ValueError(f"deqkern.{WHAT}: x of shape {tuple(x.shape)} has no batch dimension: the state "
                                     "zeros_like(x) would be solved as one scalar per entry. Pass x[None] for one "
                                     "sample, or z0=... or z_shape=... to say what a sample is")
                return torch.zeros_like(x)
            raise TypeError(f"deqkern.{WHAT}: x is a {type(x).__name__}, not a tensor or a tuple of tensors: "
                            f"{_STATE_HINT}")
        if not tensors:
            raise TypeError(f"deqkern.{WHAT}: z_shape needs a tensor in x for the batch size, dtype and device; pass "
                            "z0=... instead")
        ref = tensors[0]
        if _is_shape_list(self.z_shape):
            return tuple(ref.new_zeros((ref.shape[0], *tuple(shape))) for shape in self.z_shape)
        return ref.new_zeros((ref.shape[0], *tuple(self.z_shape)))

    def _in_autocast_dtype(self, z_init, x_const):
        """The default state under torch.autocast: in the dtype f returns on it (autocast lowers f's products, so f
        of a float32 state may come back in bfloat16), found by one evaluation of f; elsewhere as it is."""
        if not isinstance(z_init, torch.Tensor) or not torch.is_autocast_enabled(z_init.device.type):
            return z_init
        with torch.no_grad():
            probe = self.f(z_init, x_const)
        if isinstance(probe, torch.Tensor) and probe.is_floating_point() and probe.dtype != z_init.dtype:
            return z_init.to(probe.dtype)
        return z_init

    def _named_tensors(self, x):
        """x's tensors and f's parameters by name, for an error that names a non-finite one (core/policy.py)."""
        named = {"x": x} if isinstance(x, torch.Tensor) else {
            f"x[{i}]": t for i, t in enumerate(x) if isinstance(t, torch.Tensor)} if is_structured(x) else {}
        if isinstance(self.f, nn.Module):
            named.update((f"f's parameter {name!r}", p) for name, p in self.f.named_parameters())
        return named

    def _needs_grad(self, x):
        if not torch.is_grad_enabled():
            return False
        if any(isinstance(t, torch.Tensor) and t.requires_grad for t in (x if is_structured(x) else (x,))):
            return True
        if isinstance(self.f, nn.Module):
            return any(p.requires_grad for p in self.f.parameters())
        return True  # a plain callable may close over tensors that require grad: build the graph

    # ------------------------------------------------------------------ forward
    def forward(self, x, z0=None):
        """x: the input (a tensor or a tuple of them, handed to f as it is); z0: the start, a tensor (B, ...) or a
        tuple or list of them (a multiscale state). Returns z* of the state's structure."""
        x_const = _inputs_detached(x)
        z_init = self._initial(x, z0)
        if z0 is None:
            z_init = self._in_autocast_dtype(z_init, x_const)
        # A structured state is packed once: the solve, the backward modes and jac_reg all see the (B, n) packing
        # and f_map, which hands f the unpacked views and checks and packs its output at every evaluation.
        layout = StateLayout.of(WHAT, z_init) if is_structured(z_init) else None
        guessed = z0 is None and self.z_shape is None

        def f_noted(z, x):
            try:
                return self.f(z, x)
            except Exception as exc:  # the user's error stays the user's: context is added, nothing is replaced
                _add_state_note(exc, z, guessed, layout)
                raise

        if layout is None:
            f_map, start = self.f, z_init.detach()

            def fixed_point_map(z):
                out = f_noted(z, x_const)
                _check_map_output(out, z, guessed)
                return out
        else:
            f_map, start = layout.flat_map(WHAT, f_noted, who="f(z, x)"), layout.pack(z_init).detach()

            def fixed_point_map(z):
                return f_map(z, x_const)

        with torch.no_grad(), caller_inputs(WHAT, lambda: self._named_tensors(x)):
            z_star, info = solve(fixed_point_map, start, method=self.method, **self.solver_options)
        self.last_info = info

        if not self._needs_grad(x):
            return z_star if layout is None else layout.unpack(z_star)
        if self.backward_mode == "ift":
            z = f_map(z_star, x)
            if z.requires_grad:
                z = self._implicit(z, z_star, x, x_const, f_map, layout, info)
        elif self.backward_mode == "one_step":
            z = f_map(z_star, x)
        else:  # phantom
            z, tau = z_star, self.phantom_damping
            for _ in range(self.phantom_steps):
                z = f_map(z, x) if tau == 1.0 else (1 - tau) * z + tau * f_map(z, x)
        z = self._with_jacobian_penalty(z, z_star, x, f_map)
        return z if layout is None else layout.unpack(z)

    def _implicit(self, y, z_star, x, x_const, f_map, layout, info):
        """y = f(z*, x) made the implicit function's output: its backward solves the adjoint (nn/implicit_backward.py,
        second derivatives included)."""
        params = module_parameters(self.f)

        def aliased_map(z, inputs, param_values):
            x_aliased = replace_input_tensors(x, inputs)
            f = self.f if not param_values else (
                lambda z, x: torch.func.functional_call(self.f, param_values, (z, x)))
            return f(z, x_aliased) if layout is None else layout.flat_map(WHAT, f, who="f(z, x)")(z, x_aliased)

        device_type = z_star.device.type
        call = ImplicitCall(self, f_map, aliased_map, x_const, params, z_star, info, AutocastState(device_type))
        return implicit_solution(y, call, input_tensors(x), params)

    def _with_jacobian_penalty(self, z, z_star, x, f_map):
        """z carrying the gradient of jac_reg's weight times the Hutchinson estimate of ||J_f(z*)||_F^2 / numel
        (one probe, z* held constant as in Bai et al.'s code: one double-backward vector-Jacobian product)."""
        self.last_jac_loss = None
        if self.jac_reg_weight == 0.0 or not self.training or not z.requires_grad:
            return z
        if self.jac_reg_probability < 1.0 and float(torch.rand(())) >= self.jac_reg_probability:
            return z
        penalty = jacobian_reg(f_map, z_star.detach(), x)
        self.last_jac_loss = penalty.detach()
        if not penalty.requires_grad:
            return z
        return add_penalty_gradient(z, self.jac_reg_weight * penalty)

    def extra_repr(self) -> str:
        return f"method={self.method!r}, backward={self.backward_mode!r}"
