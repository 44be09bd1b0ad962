"""`python -m deqkern demo --backends ...`: the same DEQLinear classifier on the digits with each deqkern backend
(CPU C++, CUDA, Triton, the PyTorch reference), side by side: the backends agree and how fast each is."""
import time

import torch
from torch import nn

from . import _extension
from .nn import DEQLinear
from .reproduce.common import DigitsClassifier


def available_backends(device: torch.device):
    """The deqkern backends that can run on `device` (the reference last, as the yardstick)."""
    if device.type == "cuda":
        backends = (["cuda"] if _extension.CUDA_EXTENSION_BUILT else []) + (
            ["triton"] if _extension.triton_available() else []
        )
    else:
        backends = ["cpu"]
    return backends + ["reference"]


def train_one_backend(backend, args, train, test, device, dtype):
    from tqdm import tqdm

    torch.manual_seed(args.seed)
    model = DigitsClassifier(DEQLinear(64, args.hidden, activation="tanh", tol=args.tol, max_iter=args.max_iter,
                                       backend=backend, dtype=dtype, device=device), args.hidden, device=device,
                             dtype=dtype)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    x_train, y_train = train
    n_batches = (len(x_train) + args.batch_size - 1) // args.batch_size
    epoch_times, forward_iters, backward_iters = [], [], []
    for epoch in range(args.epochs):
        order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(args.seed + epoch))
        bar = tqdm(range(n_batches), desc=f"{backend:>9} epoch {epoch + 1}/{args.epochs}", leave=False,
                   disable=True if args.no_progress else None)  # None: no bar when not a terminal
        start = time.perf_counter()
        for i in bar:
            index = order[i * args.batch_size : (i + 1) * args.batch_size].to(device)
            loss = nn.functional.cross_entropy(model(x_train[index]), y_train[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if args.max_weight_norm:
                # Projected gradient: keep ||W||_2 below 1 / Lip(tanh) so every solve stays a contraction.
                with torch.no_grad():
                    W = model.layer.weight
                    W.mul_((args.max_weight_norm / torch.linalg.matrix_norm(W, ord=2)).clamp(max=1.0))
            info = model.layer.last_info
            forward_iters.append(info.iterations.float().mean().item())
            backward_iters.append(info.backward.iterations.float().mean().item())
            bar.set_postfix(loss=f"{loss.item():.3f}", fwd_it=f"{forward_iters[-1]:.1f}",
                            bwd_it=f"{backward_iters[-1]:.1f}")
        if device.type == "cuda":
            torch.cuda.synchronize()
        epoch_times.append(time.perf_counter() - start)
    with torch.no_grad():
        x_test, y_test = test
        accuracy = (model(x_test).argmax(1) == y_test).double().mean().item()
    return {
        "backend": backend,
        "test_accuracy": accuracy,
        "forward_iterations": sum(forward_iters) / len(forward_iters),
        "backward_iterations": sum(backward_iters) / len(backward_iters),
        # The first epoch includes one-off warm-up (kernel loading, caches): report the later ones when there are.
        "seconds_per_epoch": sum(epoch_times[1:] or epoch_times) / len(epoch_times[1:] or epoch_times),
    }


def run_backends(args, train, test, device, dtype):
    """The classifier trained once per backend; prints and returns a row per backend."""
    backends = args.backends if args.backends != ["available"] else available_backends(device)
    print(f"deqkern demo --backends: DEQLinear(64 -> {args.hidden}, tanh) + Linear(-> 10) on sklearn digits "
          f"({len(train[0])} train / {len(test[0])} test), {args.epochs} epochs, batch {args.batch_size}, "
          f"tol {args.tol:g}, {device} {args.dtype}, {torch.get_num_threads()} threads")
    results = [train_one_backend(backend, args, train, test, device, dtype) for backend in backends]
    print(f"{'backend':>10} | {'test acc':>8} | {'fwd iters':>9} | {'bwd iters':>9} | {'s / epoch':>9}")
    for r in results:
        print(f"{r['backend']:>10} | {r['test_accuracy']:8.4f} | {r['forward_iterations']:9.1f} | "
              f"{r['backward_iterations']:9.1f} | {r['seconds_per_epoch']:9.3f}")
    return results
