"""`python -m deqkern demo --backends ...`: the same DEQLinear classifier on the digits with each deqkern backend
(CPU C++, CUDA, Triton, the PyTorch reference), side by side: the backends agree and how fast each is."""
import torch

from ..core.backends import available_backends
from ..nn import DEQLinear
from .digits import DigitsClassifier, seconds_per_epoch, train_classifier


def train_one_backend(backend, args, train, test, device, dtype):
    torch.manual_seed(args.seed)
    model = DigitsClassifier(DEQLinear(64, args.hidden, activation="tanh", tol=args.tol, max_iter=args.max_iter,
                                       backend=backend, dtype=dtype, device=device), args.hidden, device=device,
                             dtype=dtype)

    @torch.no_grad()
    def project():
        # Projected gradient: keep ||W||_2 below 1 / Lip(tanh) so every solve stays a contraction.
        W = model.layer.weight
        W.mul_((args.max_weight_norm / torch.linalg.matrix_norm(W, ord=2)).clamp(max=1.0))

    stats = train_classifier(model, model.layer, train, test, args.epochs, args.lr, batch_size=args.batch_size,
                             seed=args.seed, after_step=project if args.max_weight_norm else None,
                             description=f"{backend:>9}", show_progress=not args.no_progress)
    return {
        "backend": backend,
        "test_accuracy": stats[-1].test_accuracy,
        # every epoch has the same number of batches: the mean of the epochs' means is the mean over all batches
        "forward_iterations": sum(s.forward_iterations for s in stats) / len(stats),
        "backward_iterations": sum(s.backward_iterations for s in stats) / len(stats),
        "seconds_per_epoch": seconds_per_epoch(stats),
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
