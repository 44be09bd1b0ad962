"""Double backward: not implemented by deqkern's implicit backward solves, so it must raise, never return a number.

torch's @once_differentiable only catches the case where the incoming gradient itself requires grad; a second
derivative also flows through the saved W, c and z, and would silently miss the solve's contribution. A backward
decorated with `single_backward(what)` therefore returns, whenever it runs with create_graph=True, gradients whose
any further differentiation raises (torch's DelayedError node): first derivatives stay usable, second ones fail loudly.
"""
import functools

import torch


def single_backward(what):
    """Decorator for an autograd.Function.backward: its results cannot be differentiated again (see the module)."""
    message = (f"deqkern.{what}: double backward (create_graph=True, then differentiating the gradient again) is not "
               "supported: the implicit backward solve is not itself differentiated; use finite differences or an "
               "unrolled solve for second derivatives").encode()

    def decorate(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grad_outputs):
            with torch.no_grad():
                grads = backward(ctx, *grad_outputs)
            if not torch.is_grad_enabled():
                return grads
            grads = grads if isinstance(grads, tuple) else (grads,)
            error = torch._C._functions.DelayedError(message, len(grads))

            def alias(grad):  # a grad_fn needs an input that requires grad: an alias of the gradient
                if grad is None:
                    return None
                grad = grad.detach()
                grad.requires_grad = True
                return grad

            return error(*[alias(g) for g in grads])

        return wrapper

    return decorate
