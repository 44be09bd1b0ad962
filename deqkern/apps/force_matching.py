"""A DEQ energy model trained on forces: the use of second derivatives (loss on dE/dx) that molecular-dynamics models
make. E(x) = readout(z*(x)), z* = tanh(z* W^T + x U^T + b); the predicted forces are -dE/dx (a gradient taken with
create_graph=True), and the loss ||F_pred - F||^2 is differentiated again in the parameters: through the implicit
backward, a second derivative.

The target is a synthetic potential on R^dim: E(x) = sum_i (x_i^2 / 2 + 0.3 cos(2 x_i)) + 0.1 sum_i x_i x_{i+1}.
`python -m deqkern.apps.force_matching` trains a few steps and prints the force loss; bench/bench_second_order.py
times the training step against the same model unrolled.
"""
import argparse

import torch
from torch import nn

from ..nn.certified import LipschitzDEQ
from ..nn.deq import DEQ


def target_energy(x: torch.Tensor) -> torch.Tensor:
    """The synthetic potential, per sample: (B, dim) -> (B,)."""
    return (0.5 * x ** 2 + 0.3 * torch.cos(2 * x)).sum(dim=1) + 0.1 * (x[:, 1:] * x[:, :-1]).sum(dim=1)


def target_forces(x: torch.Tensor) -> torch.Tensor:
    """-dE/dx of the synthetic potential."""
    x = x.detach().requires_grad_()
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(target_energy(x).sum(), x)
    return -grad


class DenseCell(nn.Module):
    """f(z, x) = tanh(z W^T + x U^T + b), W initialised with spectral norm `scale`."""

    def __init__(self, dim, hidden, scale=0.5, dtype=None):
        super().__init__()
        self.injection = nn.Linear(dim, hidden, dtype=dtype)
        weight = torch.randn(hidden, hidden, dtype=dtype)
        self.weight = nn.Parameter(scale * weight / torch.linalg.matrix_norm(weight.double(), ord=2).to(weight.dtype))

    def forward(self, z, x):
        return torch.tanh(z @ self.weight.T + self.injection(x))


class DEQEnergy(nn.Module):
    """E(x) = readout(z*(x)). layer: "DEQ" (nn.DEQ around DenseCell: Anderson, IFT), "LipschitzDEQ" (the certified
    layer, ||W||_2 < 1 at every step, solved and differentiated by the fused dense solve) or "unrolled" (DenseCell
    iterated `unrolled_steps` times from zero with autograd through every step: what a second derivative costs
    without implicit differentiation). scale: ||W||_2 of the cell at initialisation (how fast it contracts)."""

    def __init__(self, dim, hidden, *, layer="DEQ", tol=1e-5, max_iter=200, unrolled_steps=30, scale=0.5,
                 dtype=None):
        super().__init__()
        if layer not in ("DEQ", "LipschitzDEQ", "unrolled"):
            raise ValueError(f"deqkern.DEQEnergy: layer must be 'DEQ', 'LipschitzDEQ' or 'unrolled', got {layer!r}")
        self.layer_kind, self.unrolled_steps = layer, unrolled_steps
        if layer == "LipschitzDEQ":
            self.layer = LipschitzDEQ(dim, hidden, tol=tol, max_iter=max_iter, dtype=dtype)
        else:
            self.cell = DenseCell(dim, hidden, scale=scale, dtype=dtype)
            options = dict(tol=tol, max_iter=max_iter)
            self.layer = DEQ(self.cell, solver_options=options, backward_options=options, z_shape=(hidden,))
        self.readout = nn.Linear(hidden, 1, dtype=dtype)

    def equilibrium(self, x):
        if self.layer_kind != "unrolled":
            return self.layer(x)
        z = x.new_zeros(x.shape[0], self.cell.weight.shape[0])
        for _ in range(self.unrolled_steps):
            z = self.cell(z, x)
        return z

    def energy(self, x):
        return self.readout(self.equilibrium(x)).squeeze(1)

    def forces(self, x):
        """-dE/dx, differentiable in the parameters (create_graph=True)."""
        x = x if x.requires_grad else x.detach().requires_grad_()
        (grad,) = torch.autograd.grad(self.energy(x).sum(), x, create_graph=True)
        return -grad


def force_loss(model, x, forces):
    return ((model.forces(x) - forces) ** 2).sum(dim=1).mean()


def train(model, steps=20, batch=64, dim=8, lr=1e-2, seed=0):
    """Adam on the force loss, fresh random positions each step; returns the loss per step."""
    generator = torch.Generator().manual_seed(seed)
    dtype = model.readout.weight.dtype
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        x = torch.randn(batch, dim, generator=generator, dtype=dtype)
        loss = force_loss(model, x, target_forces(x))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layer", default="DEQ", choices=["DEQ", "LipschitzDEQ", "unrolled"])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--hidden", type=int, default=32)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = DEQEnergy(8, args.hidden, layer=args.layer)
    losses = train(model, steps=args.steps)
    print(f"force loss: step 1 {losses[0]:.4f}, step {len(losses)} {losses[-1]:.4f}")
    return losses


if __name__ == "__main__":
    main()
