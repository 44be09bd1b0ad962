"""Training on several processes: DistributedDataParallel with the gloo backend on 2 local processes (127.0.0.1, a
free port), and an f with a collective inside, where ranks whose samples converge at different iterations would call
it a different number of times and hang without `process_group=`. Each test has a timeout, so a regression fails
instead of hanging CI."""
import io
import multiprocessing
import os
import socket
import traceback

import pytest
import torch

TIMEOUT_S = 90
WORLD = 2


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(worker, *args):
    """Runs worker(rank, port, *args) on WORLD spawned processes; returns their results (rank order)."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    port = _free_port()
    processes = [context.Process(target=_entry, args=(worker, rank, port, queue, args)) for rank in range(WORLD)]
    for p in processes:
        p.start()
    results = {}
    try:
        for _ in range(WORLD):
            rank, ok, payload = queue.get(timeout=TIMEOUT_S)
            if not ok:
                pytest.fail(f"rank {rank} failed:\n{payload}")
            results[rank] = torch.load(io.BytesIO(payload))
    except Exception as exc:  # queue.Empty: a rank hung
        if not isinstance(exc, pytest.fail.Exception):
            pytest.fail(f"the ranks did not finish within {TIMEOUT_S} s (a hang): {exc!r}")
        raise
    finally:
        for p in processes:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [results[rank] for rank in range(WORLD)]


def _entry(worker, rank, port, queue, args):
    import torch.distributed as dist

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
        try:
            buffer = io.BytesIO()  # as bytes: a tensor put in the queue would be shared memory, gone with the process
            torch.save(worker(rank, *args), buffer)
            queue.put((rank, True, buffer.getvalue()))
        finally:
            dist.destroy_process_group()
    except BaseException:
        queue.put((rank, False, traceback.format_exc()))


# ---------------------------------------------------------------- DDP: gradients equal across ranks and to one process
def _model(kind):
    import deqkern

    torch.manual_seed(0)
    if kind == "DEQLinear":
        deq = deqkern.nn.DEQLinear(6, 10, tol=1e-10, max_iter=300, dtype=torch.float64)
    else:
        f = torch.nn.Sequential(torch.nn.Linear(10, 10, dtype=torch.float64), torch.nn.Tanh())
        torch.nn.init.normal_(f[0].weight, std=0.1)
        layer = deqkern.nn.DEQ(lambda z, x: f(z + x), method="anderson", solver_options=dict(tol=1e-10, max_iter=300),
                               backward_options=dict(tol=1e-10, max_iter=300), z_shape=(10,))
        layer.f_module = f  # registers f's parameters
        proj = torch.nn.Linear(6, 10, dtype=torch.float64)
        return torch.nn.ModuleDict(dict(proj=proj, deq=layer))
    return torch.nn.ModuleDict(dict(deq=deq))


def _forward(model, kind, x):
    if kind == "DEQLinear":
        return model["deq"](x)
    return model["deq"](model["proj"](x))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 6, dtype=torch.float64, generator=g), torch.randn(8, 10, dtype=torch.float64, generator=g)


class _Wrapped(torch.nn.Module):
    """The model with a forward DDP can call: DDP averages the gradients in its backward hooks."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.inner = _model(kind)

    def forward(self, x):
        return _forward(self.inner, self.kind, x)


def _ddp_worker_wrapped(rank, kind):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(_Wrapped(kind))
    x, y = _data()
    shard = slice(rank * 4, rank * 4 + 4)
    ((model(x[shard]) - y[shard]) ** 2).mean().backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    gathered = [torch.zeros_like(grads) for _ in range(WORLD)]
    dist.all_gather(gathered, grads)
    return [g.clone() for g in gathered]


@pytest.mark.parametrize("kind", ["DEQLinear", "DEQ"])
def test_ddp_gradients_equal_across_ranks_and_to_one_process(kind):
    results = _run(_ddp_worker_wrapped, kind)
    for rank_grads in results:
        torch.testing.assert_close(rank_grads[0], rank_grads[1], rtol=0, atol=0)
    single = _Wrapped(kind)
    x, y = _data()
    ((single(x) - y) ** 2).mean().backward()
    reference = torch.cat([p.grad.flatten() for p in single.parameters()])
    torch.testing.assert_close(results[0][0], reference, rtol=1e-8, atol=1e-12)


# ---------------------------------------------------------------- a collective inside f
def _collective_worker(rank, method):
    import torch.distributed as dist

    import deqkern

    g = torch.Generator().manual_seed(rank)
    a = torch.randn(12, 12, dtype=torch.float64, generator=g)
    W = (0.3 if rank == 0 else 0.97) * a / torch.linalg.matrix_norm(a, ord=2)  # rank 1 needs many more iterations
    c = torch.randn(5, 12, dtype=torch.float64, generator=g)
    calls = []

    def f(z):
        total = z.sum().reshape(1).clone()
        dist.all_reduce(total)  # a collective every evaluation, as SyncBatchNorm or tensor parallelism would do
        calls.append(1)
        return torch.tanh(z @ W.T + c) + 0.0 * total

    z, info = deqkern.solve(f, torch.zeros_like(c), method=method, tol=1e-10, max_iter=400,
                            process_group=dist.group.WORLD)
    alone, _ = deqkern.solve(lambda z: torch.tanh(z @ W.T + c), torch.zeros_like(c), method=method, tol=1e-10,
                             max_iter=400)
    return dict(z=z, alone=alone, converged=bool(info.converged.all()), calls=len(calls),
                iterations=int(info.iterations.max()))


@pytest.mark.parametrize("method", ["anderson", "picard", "broyden"])
def test_collective_inside_f_does_not_hang(method):
    results = _run(_collective_worker, method)
    assert results[0]["calls"] == results[1]["calls"]  # every rank evaluated f (and its all_reduce) equally often
    assert results[0]["iterations"] < results[1]["iterations"] <= results[1]["calls"]
    for r in results:
        assert r["converged"]
        torch.testing.assert_close(r["z"], r["alone"], rtol=1e-8, atol=1e-10)
