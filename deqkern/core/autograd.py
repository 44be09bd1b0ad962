"""The autograd pieces every implicit backward shares: differentiating a linear fixed point (the adjoint) once more,
and a loud error wherever a derivative is not implemented.

Second derivatives of a DEQ need the adjoint g = A g + b (A = J^T at z*) as a differentiable function of z*, the
parameters and the incoming gradient. `implicit_linear_solution(y, solve_transposed, what)` gives it: y = A g* + b is
computed with a graph from the solved g* (held constant), and the identity node put on y turns an incoming u into
w = (I - A^T)^{-1} u, which autograd then carries through y's graph: the implicit function theorem for a linear fixed
point. Its own backward is not differentiated again (a third derivative raises).

torch's @once_differentiable only catches the case where the incoming gradient itself requires grad; a second
derivative also flows through saved tensors, and would silently miss a solve's contribution. `raise_when_differentiated`
returns values whose differentiation in given tensors raises (torch's DelayedError node) instead.
"""
import torch


def raise_when_differentiated(message: bytes, *values, anchors=()):
    """values unchanged, but differentiating them raises RuntimeError(message) (None stays None). anchors: the
    tensors a derivative of values may be asked in; each value is tied to them by an exactly-zero term, so that
    autograd's way from a value to an anchor runs through the raising node (it would otherwise find no way and
    return the other paths' number, or "not used in the graph")."""
    error = torch._C._functions.DelayedError(message, len(values))
    tie = [a.flatten()[:0].sum() for a in anchors if isinstance(a, torch.Tensor) and a.requires_grad]

    def alias(value):  # a grad_fn needs an input that requires grad: an alias of the value
        if value is None:
            return None
        value = value.detach()
        if tie:
            return value + sum(tie)  # + exactly 0 (sums over no entries), with a graph to every anchor
        value.requires_grad = True
        return value

    with torch.enable_grad():
        out = error(*[alias(v) for v in values])
    return out if isinstance(out, tuple) else (out,)


class _ImplicitLinearSolution(torch.autograd.Function):
    """y -> y; backward: u -> solve_transposed(u) = (I - A^T)^{-1} u (see the module)."""

    @staticmethod
    def forward(ctx, y, solve_transposed, what):
        ctx.solve_transposed, ctx.what = solve_transposed, what
        ctx.save_for_backward(y)  # its graph reaches every tensor a third derivative could be asked in
        return y.view_as(y)

    @staticmethod
    def backward(ctx, u):
        with torch.no_grad():
            w = ctx.solve_transposed(u.detach())
        if torch.is_grad_enabled():  # a third derivative of the DEQ
            message = (f"deqkern.{ctx.what}: a third derivative is not supported: second derivatives are "
                       "implemented, higher ones are not").encode()
            (w,) = raise_when_differentiated(message, w, anchors=ctx.saved_tensors)
        return w, None, None


def implicit_linear_solution(y: torch.Tensor, solve_transposed, what: str) -> torch.Tensor:
    """The solution g of g = A g + b as a differentiable tensor: y = A g* + b computed with a graph from the solved g*
    (held constant); solve_transposed(u) returns w = (I - A^T)^{-1} u."""
    return _ImplicitLinearSolution.apply(y, solve_transposed, what)


def graph_leaves(root, stops=()):
    """The leaf tensors (AccumulateGrad variables) that autograd node `root` reaches, not walking past `stops` (the
    grad_fn of inputs that are tracked by other means). Python over the graph's nodes: for checks, not hot loops."""
    stops = {id(node) for node in stops if node is not None}
    seen, stack, leaves = set(), [root], []
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if id(node) in stops:
            continue
        variable = getattr(node, "variable", None)
        if variable is not None:
            leaves.append(variable)
            continue
        stack.extend(next_node for next_node, _ in node.next_functions)
    return leaves
