"""nn.DEQ's implicit (IFT) backward, to first and second order.

Forward: y = f(z*, x) once with grad (z* a constant), then `_ImplicitSolution` on y, an identity whose inputs also
include the tensors of x that require grad and the parameters of f (when f is an nn.Module).

Backward, first order (create_graph=False): the incoming v becomes the adjoint g = (I - J^T)^{-1} v (J = df/dz at z*,
vector-Jacobian products by autograd on one fresh evaluation of f), returned for y: autograd carries it through y's
graph to x, the parameters and any tensor f closes over. dL/dtheta = g^T df/dtheta, the implicit function theorem.

Backward with create_graph=True: the gradients of x's tensors and of f's parameters are returned directly, built by
differentiable operations, so that they can be differentiated again:
- z* differentiable: z* + (out - out.detach()), out this node's output, whose derivative is this node's (recursion);
- f evaluated on aliases of z*, x's tensors and the parameters (torch.func.functional_call), so that the gradient
  in an alias is f's partial derivative while the result stays connected to the real tensors;
- g differentiable: the solved g* made a function of z*, x, the parameters and v by the implicit derivative of its
  linear fixed point (core/autograd.implicit_linear_solution), whose transposed solve w = J w + u takes Jacobian-vector
  products by double vector-Jacobian products on a fresh evaluation of f.
Tensors that f uses but that are neither x's nor its parameters (a closure, a tensor cached outside f) cannot be
aliased: then the create_graph backward returns the first-order gradient through y's graph, and differentiating it
again raises, naming the tensor (never a second derivative that misses a term).
"""
import contextlib

import torch

from ..core.autograd import graph_leaves, implicit_linear_solution, raise_when_differentiated
from ..solvers.generic import solve
from ..solvers.state import is_structured

WHAT = "nn.DEQ"


def input_tensors(x):
    """The tensors of x (a tensor, or the tensor items of a tuple or list) that require grad, in order."""
    items = x if is_structured(x) else (x,)
    return [t for t in items if isinstance(t, torch.Tensor) and t.requires_grad]


def replace_input_tensors(x, replacements):
    """x with its tensors that require grad replaced, in order, by `replacements`; its other tensors detached."""
    if isinstance(x, torch.Tensor):
        return replacements[0] if x.requires_grad else x.detach()
    if not is_structured(x):
        return x
    it = iter(replacements)
    return type(x)(next(it) if isinstance(t, torch.Tensor) and t.requires_grad else
                   (t.detach() if isinstance(t, torch.Tensor) else t) for t in x)


class AutocastState:
    """The autocast state of the forward on a device type, re-entered by the backward's evaluations of f (autograd
    runs a backward outside the forward's autocast context)."""

    def __init__(self, device_type: str):
        self.device_type = device_type
        self.enabled = torch.is_autocast_enabled(device_type)
        self.dtype = torch.get_autocast_dtype(device_type) if self.enabled else None

    def __call__(self):
        if not self.enabled:
            return torch.autocast(self.device_type, enabled=False) if torch.is_autocast_enabled(
                self.device_type) else contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


class ImplicitCall:
    """What the backward needs of one forward: the flat map (first order), how to evaluate f on aliases (second
    order), x with its tensors, the parameters' names, the options of the adjoint solve, where to report its info."""

    def __init__(self, deq, f_map, aliased_map, x, params, z_star, info, autocast: AutocastState):
        self.deq, self.f_map, self.aliased_map, self.x = deq, f_map, aliased_map, x
        self.param_names = [name for name, _ in params]
        self.z_star, self.info, self.autocast = z_star, info, autocast

    def report(self, binfo):
        if self.info is not None and not torch.compiler.is_compiling():
            self.info.backward = binfo
        self.deq.last_backward_info = binfo

    def adjoint_solve(self, vjp, v):
        """g = vjp(g) + v by deqkern.solve with the layer's backward_options."""
        g, binfo = solve(lambda g: vjp(g) + v, torch.zeros_like(v), **self.deq.backward_options)
        self.report(binfo)
        return g


class _ImplicitSolution(torch.autograd.Function):
    """Identity on y = f(z*, x); the backward replaces the incoming gradient by the implicit one (see the module)."""

    @staticmethod
    def forward(ctx, y, call: ImplicitCall, n_inputs: int, *explicit):
        ctx.call, ctx.n_inputs, ctx.y_fn = call, n_inputs, y.grad_fn
        ctx.x_fns = [t.grad_fn for t in explicit[:n_inputs]]
        # ids of the tensors themselves: saved tensors may come back as other objects (saved-tensor hooks)
        ctx.explicit_order = [id(t) for t in explicit]
        ctx.explicit_ids = set(ctx.explicit_order)
        out = y.view_as(y)
        ctx.save_for_backward(out, *explicit)
        return out

    @staticmethod
    def backward(ctx, v):
        call = ctx.call
        if not torch.is_grad_enabled():
            return (_first_order(call, v), None, None) + (None,) * (len(ctx.saved_tensors) - 1)
        out, *explicit = ctx.saved_tensors
        grad_y, grads = _second_order(ctx, call, out, explicit, v)
        return (grad_y, None, None) + tuple(grads)


def _evaluate_at_fixed_point(call: ImplicitCall):
    """(h, f(h, x)) with h a leaf copy of z* that requires grad, under the forward's autocast state: the graph the
    adjoint's vector-Jacobian products are taken on."""
    with torch.enable_grad(), call.autocast():
        h = call.z_star.detach().requires_grad_()
        return h, call.f_map(h, call.x)


def _first_order(call: ImplicitCall, v):
    """g = (I - J^T)^{-1} v at z*, for y's graph."""
    h, fh = _evaluate_at_fixed_point(call)

    def vjp(g):
        return torch.autograd.grad(fh, h, g.to(fh.dtype), retain_graph=True)[0]

    return call.adjoint_solve(vjp, v).detach()


def _unfollowed_tensor(ctx, leaves):
    """Why a second derivative could not follow f, or None: a leaf of y's graph (`leaves`, x's own history aside)
    that is neither a tensor of x nor a parameter of f (a closure, or a tensor derived outside f)."""
    for leaf in leaves:
        if id(leaf) not in ctx.explicit_ids:
            return (f"f depends on a tensor of shape {tuple(leaf.shape)} that is neither a parameter of f nor a tensor "
                    "of x (a closure, or a tensor derived outside f); make it a parameter of an nn.Module f, or pass "
                    "it in x")
    return None


def _guarded_first_order(call, v, anchors, why):
    """The first-order gradient for y's graph, whose differentiation in any of `anchors` (the tensors y depends on)
    raises, naming why."""
    message = (f"deqkern.{WHAT}: a second derivative (differentiating a gradient taken with create_graph=True) "
               f"cannot be computed here: {why}").encode()
    with torch.no_grad():
        g = _first_order(call, v)
    return raise_when_differentiated(message, g, anchors=[*anchors, v])[0]


def _second_order(ctx, call: ImplicitCall, out, explicit, v):
    """(gradient for y, gradients of x's tensors and f's parameters): the latter differentiable (see the module); or,
    where f uses a tensor the aliases cannot reach, the first-order gradient for y, guarded."""
    leaves = graph_leaves(ctx.y_fn, stops=ctx.x_fns)  # walked once: Python over f's graph
    why = _unfollowed_tensor(ctx, leaves)
    if why is not None:
        return _guarded_first_order(call, v, [*explicit, *leaves], why), [None] * len(explicit)
    n_inputs = ctx.n_inputs
    z_star = call.z_star.detach()
    with torch.enable_grad(), call.autocast():
        z_alias = (z_star + (out - out.detach())).view_as(z_star)
        aliases = [t.view_as(t) for t in explicit]
        fz = call.aliased_map(z_alias, aliases[:n_inputs], dict(zip(call.param_names, aliases[n_inputs:])))

        def vjp(g, create_graph=False):
            return torch.autograd.grad(fz, z_alias, g.to(fz.dtype), retain_graph=True, create_graph=create_graph)[0]

        with torch.no_grad():
            g_solved = call.adjoint_solve(vjp, v.detach())
        y = vjp(g_solved, create_graph=True) + v
        g = implicit_linear_solution(y, _forward_solve(call), WHAT)
        grads = torch.autograd.grad(fz, aliases, g.to(fz.dtype), create_graph=True, allow_unused=True)
    reached = {id(leaf) for leaf in leaves}
    for t, grad, original in zip(explicit, grads, ctx.explicit_order):
        if grad is None and original in reached:  # f read it in the forward, but not through its alias
            why = (f"f's forward depended on a parameter of shape {tuple(t.shape)} that f does not read when called "
                   "with other parameter values (a weight cached outside f?): compute it inside f")
            return _guarded_first_order(call, v, [*explicit, *leaves], why), [None] * len(explicit)
    return None, list(grads)


def _forward_solve(call: ImplicitCall):
    """u -> w = (I - J)^{-1} u at z*, J w by a double vector-Jacobian product on one fresh evaluation of f."""

    def solve_transposed(u):
        h, fh = _evaluate_at_fixed_point(call)
        with torch.enable_grad():
            probe = torch.zeros_like(fh, requires_grad=True)
            jt = torch.autograd.grad(fh, h, probe, create_graph=True)[0]

        def jvp(w):
            with torch.enable_grad():
                return torch.autograd.grad(jt, probe, w.to(jt.dtype), retain_graph=True)[0]

        w, _ = solve(lambda w: jvp(w) + u, torch.zeros_like(u), **call.deq.backward_options)
        return w

    return solve_transposed


def implicit_solution(y, call: ImplicitCall, inputs, params) -> torch.Tensor:
    return _ImplicitSolution.apply(y, call, len(inputs), *inputs, *[p for _, p in params])


def module_parameters(f) -> list:
    """(name, parameter) of f's parameters that require grad, when f is an nn.Module; else []."""
    if not isinstance(f, torch.nn.Module):
        return []
    return [(name, p) for name, p in f.named_parameters() if p.requires_grad]
