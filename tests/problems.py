"""Test problems shared by the test files."""
import torch


def contractive_matrix(d, dtype=torch.float64, device="cpu", norm=0.9, generator=None):
    """A random (d, d) matrix with spectral norm `norm`."""
    a = torch.randn(d, d, dtype=torch.float64, generator=generator)
    return (norm * a / torch.linalg.matrix_norm(a, ord=2)).to(dtype=dtype, device=device)


def dense_problem(batch, d, dtype=torch.float64, device="cpu", seed=0, norm=0.9):
    """(W, c, z0) with rows of c scaled differently, so that samples converge at different speeds."""
    g = torch.Generator().manual_seed(seed)
    W = contractive_matrix(d, dtype, device, norm, g)
    scales = torch.linspace(0.01, 3.0, batch, dtype=torch.float64)[:, None]
    c = (torch.randn(batch, d, dtype=torch.float64, generator=g) * scales).to(dtype=dtype, device=device)
    z0 = torch.randn(batch, d, dtype=torch.float64, generator=g).to(dtype=dtype, device=device)
    return W, c, z0


def report(name, out, ref):
    """Print max/mean difference before asserting, as the kernel packages we admire do."""
    diff = (out.double() - ref.double()).abs()
    if diff.numel():
        print(f"{name}: max diff {diff.max().item():.3e}, mean diff {diff.mean().item():.3e}")
