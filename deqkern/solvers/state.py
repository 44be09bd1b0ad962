"""States made of several tensors (a multiscale DEQ keeps one per resolution): how such a state maps to the solvers'
(B, n) buffer and back. The one place that knows it: `deqkern.solve`, `nn.DEQ` and the torchdeq adapter use it.

A state is a tensor (B, ...) or a tuple or list of them: one batch size, one dtype, one device, any shapes. It is
packed once per solve into a (B, n) buffer, n the sum of the per-sample sizes, in order; f is handed views of the
buffer in the original shapes (no copy) and its output, of the same structure, is gathered into a reused (B, n)
buffer (the one copy an evaluation needs). The residual and the stop rule are per sample over the whole state.
"""
import math
from typing import Callable, Sequence, Tuple, Union

import torch

from ..core import validation
from ..core.dtypes import SOLVE_DTYPES

State = Union[torch.Tensor, Sequence[torch.Tensor]]


def is_structured(state) -> bool:
    """True for a tuple or list (of tensors), the states this module packs; a tensor is used as it is."""
    return isinstance(state, (tuple, list))


class StateLayout:
    """The structure of a state of several tensors: its container type, each tensor's per-sample shape, the batch
    size, dtype and device. `of` checks a state and reads its layout; `pack`, `unpack` and `check` use it."""

    def __init__(self, kind, shapes: Tuple[Tuple[int, ...], ...], batch: int, dtype, device):
        self.kind, self.shapes, self.batch, self.dtype, self.device = kind, shapes, batch, dtype, device
        self.sizes = tuple(math.prod(shape) for shape in shapes)
        self.width = sum(self.sizes)

    @classmethod
    def of(cls, what: str, state, name: str = "z0") -> "StateLayout":
        """The layout of a tuple or list of tensors (B, ...), checked: not empty, tensors only, one batch size, one
        dtype, one device."""
        if len(state) == 0:
            raise ValueError(f"deqkern.{what}: {name} is an empty {type(state).__name__}: a state needs at least one "
                             "tensor")
        first = state[0]
        for i, t in enumerate(state):  # a tensor of the solves' dtypes, of the first one's dtype and device
            validation.check_tensor(what, f"{name}[{i}]", t, dtypes=SOLVE_DTYPES, like=first if i else None,
                                    like_name=f"{name}[0]")
            if t.dim() < 1:
                raise ValueError(f"deqkern.{what}: {name}[{i}] must have a batch dimension: (B, ...), got a 0-d "
                                 "tensor")
            if t.shape[0] != first.shape[0]:
                raise ValueError(f"deqkern.{what}: {name}[{i}] has batch size {t.shape[0]} but {name}[0] has "
                                 f"{first.shape[0]}: every tensor of a state has one batch size")
        return cls(type(state), tuple(tuple(t.shape[1:]) for t in state), first.shape[0], first.dtype, first.device)

    def describe(self) -> str:
        return f"{self.kind.__name__} of {len(self.shapes)} tensors of per-sample shapes {list(self.shapes)}"

    def pack(self, state, out=None) -> torch.Tensor:
        """(B, n): the tensors of `state` flattened per sample and concatenated, in order (into `out` if given)."""
        rows = [t.reshape(self.batch, -1) for t in state]
        if out is None:
            return torch.cat(rows, dim=1)
        return torch.cat(rows, dim=1, out=out)

    def unpack(self, flat: torch.Tensor):
        """The state of this layout whose tensors are views of flat (B, n) (differentiable: slices and views)."""
        parts = torch.split(flat, self.sizes, dim=1)  # (B, n_i) slices whose rows are contiguous: reshape is a view
        return self.kind(part.reshape(flat.shape[0], *shape) for part, shape in zip(parts, self.shapes))

    def check(self, what: str, out, evaluation: int, who: str = "f") -> None:
        """`out` (f's output at this evaluation) has this layout: the same container length and shapes, the state's
        dtype and device. Metadata only, no synchronisation."""
        at = f" at evaluation {evaluation}" if evaluation else ""
        if not is_structured(out) or len(out) != len(self.shapes):
            got = (f"a {type(out).__name__} of {len(out)}" if is_structured(out) else
                   f"a {type(out).__name__}")
            raise TypeError(f"deqkern.{what}: {who} returned {got}{at} for a state that is a {self.describe()}: f "
                            "must return a state of the same structure")
        for i, (t, shape) in enumerate(zip(out, self.shapes)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"deqkern.{what}: {who} returned a {type(t).__name__} as tensor {i}{at}")
            if tuple(t.shape) != (self.batch, *shape):
                raise ValueError(f"deqkern.{what}: {who} returned tensor {i} of shape {tuple(t.shape)}{at} but the "
                                 f"state's tensor {i} is {(self.batch, *shape)}: f must map each tensor to its shape")
            if t.dtype != self.dtype or t.device != self.device:
                raise TypeError(f"deqkern.{what}: {who} returned tensor {i} as {t.dtype} on {t.device}{at} but the "
                                f"state is {self.dtype} on {self.device}: f must keep the state's dtype and device")

    def flat_map(self, what: str, f: Callable, who: str = "f") -> Callable[..., torch.Tensor]:
        """g(x (B, n), *args) = pack(f(unpack(x), *args)), f's output checked at every evaluation. Without grad mode
        (inside a solve) the output is gathered into one reused buffer, which the solvers read before they evaluate
        f again; with it, into a new tensor, so that a graph runs through the concatenation and no result is
        overwritten by the next evaluation."""
        evaluations = [0]
        buffer = [None]

        def g(flat, *args):
            if not torch.compiler.is_compiling():  # a traced loop body mutates nothing it closes over
                evaluations[0] += 1
            out = f(self.unpack(flat), *args)
            self.check(what, out, evaluations[0], who)
            if torch.is_grad_enabled() or torch.compiler.is_compiling():  # traced: a loop body writes no closure
                return self.pack(out)
            if buffer[0] is None or buffer[0].shape != flat.shape:
                buffer[0] = flat.new_empty(flat.shape)
            return self.pack(out, out=buffer[0])

        return g
