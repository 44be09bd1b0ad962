"""Pure-PyTorch references: the executable specification of every deqkern op.

Every backend (CPU C++, CUDA, Triton) is tested against these functions. They are written for clarity,
not speed, and must never be edited to match a kernel.

Conventions shared by all solves:
- iterate x <- (1 - alpha) x + alpha T(x), one evaluation of T per iteration;
- per-sample relative residual r = ||T(x) - x|| / (||T(x)|| + RESIDUAL_EPS) of the iterate T was applied to;
- a sample stops once r <= tol (converged) or r is not finite (NaN/Inf: stopped, not converged);
  a stopped sample is frozen, so its result does not depend on the other samples of the batch;
- the returned x is the last update, `iterations` counts evaluations of T, `residual` is the last r;
- a sample whose inputs are not all finite (its rows of the batch inputs, or any entry of W) is never
  iterated: x stays its start, iterations 0, residual NaN, converged False. So bad input is flagged per
  sample by the kernels themselves, even where an activation would hide it (tanh(inf) = 1).
"""
import torch

from .activations import get_activation

RESIDUAL_EPS = 1e-12


def _finite_rows(W, *batch_tensors):
    """(batch,) bool: W is all finite and so is the sample's row of every batch tensor."""
    valid = torch.isfinite(W).all().expand(batch_tensors[0].shape[0])
    for t in batch_tensors:
        valid = valid & torch.isfinite(t).all(dim=1)
    return valid


def _damped_picard_ref(step, x0, alpha, tol, max_iter, valid):
    """Solve x = step(x) for the rows where `valid`; returns (x, iterations int32, residual, converged bool)."""
    x = x0.clone()
    batch = x.shape[0]
    iterations = torch.zeros(batch, dtype=torch.int32, device=x.device)
    residual = torch.full((batch,), float("nan"), dtype=x.dtype, device=x.device)
    active = valid.clone()
    for k in range(1, max_iter + 1):
        tx = step(x)
        r = (tx - x).norm(dim=1) / (tx.norm(dim=1) + RESIDUAL_EPS)
        x = torch.where(active[:, None], (1 - alpha) * x + alpha * tx, x)
        residual = torch.where(active, r, residual)
        iterations = torch.where(active, torch.full_like(iterations, k), iterations)
        active = active & (r > tol) & torch.isfinite(r)
        if not active.any():
            break
    return x, iterations, residual, residual <= tol


def fixed_point_dense_ref(W, c, z0, activation, alpha, tol, max_iter):
    """Fixed point of z = act(z W^T + c).  W: (d, d), c: (batch, d), z0: (batch, d)."""
    act = get_activation(activation).fn
    return _damped_picard_ref(lambda z: act(z @ W.T + c), z0, alpha, tol, max_iter, _finite_rows(W, c, z0))


def fixed_point_dense_backward_ref(W, c, z, grad_z, activation, alpha, tol, max_iter):
    """Implicit backward of fixed_point_dense at its fixed point z.

    With u = z W^T + c and s = act'(u), the adjoint g solves g = (s * g) W + grad_z. The solve iterates on
    grad_u = s * g, which satisfies grad_u = s * (grad_u W + grad_z), starting from 0; then
    dL/dc = grad_u and dL/dW = grad_u^T z. Rows with a non-finite entry in z, c or grad_z (or any in W) are
    not iterated (see the module docstring). Returns (grad_u, iterations, residual, converged).
    """
    s = get_activation(activation).derivative(z @ W.T + c)
    valid = _finite_rows(W, c, z, grad_z)
    return _damped_picard_ref(lambda h: s * (h @ W + grad_z), torch.zeros_like(z), alpha, tol, max_iter, valid)


# ---------------------------------------------------------------- power iteration (Lipschitz constants)
POWER_ITERATION_MODES = ("gram", "symmetric")


def _normalise_rows(z, fallback):
    """z / ||z|| per row; rows with a zero (or NaN) norm keep `fallback` (no 0/0)."""
    norm = z.norm(dim=1, keepdim=True)
    return torch.where(norm > 0, z / norm, fallback)


def power_iteration_ref(W, row_scale, u0, mode, shift, max_iter, tol):
    """Batched power iteration on J_b = diag(row_scale_b) W.  W: (m, n), row_scale: (B, m) or None, u0: (B, n).

    "gram":      v <- J^T J v / ||.||,                 value = ||J v|| = sqrt(v^T J^T J v)  -> ||J||_2
    "symmetric": v <- (S + shift I) v / ||.||, S = (J + J^T) / 2,   value = v^T S v = v^T J v -> lambda_max(S)
    (square W only; shift >= -lambda_min(S) makes S + shift I PSD, so its top eigenvector is lambda_max's).
    v starts at u0 / ||u0||; value_k is the Rayleigh value of the k-th iterate before its update. A sample stops
    once |value_k - value_{k-1}| <= tol * |value_k| (k >= 2: converged) or value_k is not finite (not converged);
    stopped samples are frozen. A zero J v (or J^T J v) leaves v unchanged instead of dividing by 0.
    Returns (value (B,), u (B, n) the last normalised iterate, iterations int32 (B,), converged bool (B,)).
    """
    batch = u0.shape[0]
    s = torch.ones(batch, W.shape[0], dtype=W.dtype, device=W.device) if row_scale is None else row_scale
    v = _normalise_rows(u0, u0)
    value = torch.zeros(batch, dtype=W.dtype, device=W.device)
    previous = torch.full_like(value, float("nan"))
    iterations = torch.zeros(batch, dtype=torch.int32, device=W.device)
    converged = torch.zeros(batch, dtype=torch.bool, device=W.device)
    active = torch.ones(batch, dtype=torch.bool, device=W.device)
    for k in range(1, max_iter + 1):
        jv = s * (v @ W.T)                                   # (B, m)
        if mode == "gram":
            val = jv.norm(dim=1)
            z = (s * jv) @ W                                 # J^T J v
        elif mode == "symmetric":
            val = (v * jv).sum(dim=1)
            z = 0.5 * (jv + (s * v) @ W) + shift * v         # (S + shift I) v
        else:
            raise ValueError(f"unknown mode {mode!r}; choose one of {POWER_ITERATION_MODES}")
        stop_converged = (val - previous).abs() <= tol * val.abs()  # False at k = 1 (previous is NaN)
        v = torch.where(active[:, None], _normalise_rows(z, v), v)
        value = torch.where(active, val, value)
        iterations = torch.where(active, torch.full_like(iterations, k), iterations)
        converged = torch.where(active, stop_converged, converged)
        active = active & ~stop_converged & torch.isfinite(val)
        previous = val
        if not active.any():
            break
    return value, v, iterations, converged


# ---------------------------------------------------------------- Anderson acceleration (dense fixed point)
ANDERSON_MAX_M = 16


def _anderson_weights(gram, n, slot, lam):
    """Type-II Anderson weights a (B, n), sum(a) = 1, minimising ||sum_i a_i g_i||^2 + lam sum_i a_i^2 G_ii.

    gram: (B, m, m) float64 Gram matrix G_ij = <g_i, g_j> of the stored residuals (first n slots valid).
    Solves the bordered system [[0, 1^T], [1, G + lam diag(G)]] [nu; a] = [1; 0] in float64. Where that system
    is singular or its solution not finite (e.g. a zero residual), a = e_slot: the plain (mixed) Picard step.
    """
    batch = gram.shape[0]
    g = gram[:, :n, :n]
    bordered = torch.zeros(batch, n + 1, n + 1, dtype=torch.float64, device=gram.device)
    bordered[:, 0, 1:] = 1
    bordered[:, 1:, 0] = 1
    bordered[:, 1:, 1:] = g + lam * torch.diag_embed(torch.diagonal(g, dim1=1, dim2=2))
    rhs = torch.zeros(batch, n + 1, dtype=torch.float64, device=gram.device)
    rhs[:, 0] = 1
    sol, info = torch.linalg.solve_ex(bordered, rhs)
    a = sol[:, 1:]
    ok = (info == 0) & torch.isfinite(a).all(dim=1)
    fallback = torch.zeros_like(a)
    fallback[:, slot] = 1
    return torch.where(ok[:, None], a, fallback)


def _anderson_ref(step, x0, m, beta, lam, tol, max_iter, valid):
    """Solve x = step(x) by type-II Anderson acceleration for the rows where `valid`.

    Per sample, iteration k (1-based) evaluates t = step(x) (one evaluation of the layer), r as Picard, stores
    x and g = t - x in history slot (k - 1) % m (a ring buffer of the last n = min(k, m) pairs) and moves to
        x <- sum_i a_i (x_i + beta g_i)      (beta = 1: sum_i a_i step(x_i); n = 1: the damped Picard step)
    with the weights of _anderson_weights. Stopping, freezing, non-finite inputs and the returned x (the last
    update, i.e. the mixture computed after the final evaluation) follow the Picard conventions of this module.
    Returns (x, iterations int32, residual, converged bool).
    """
    x = x0.clone()
    batch, d = x.shape
    iterations = torch.zeros(batch, dtype=torch.int32, device=x.device)
    residual = torch.full((batch,), float("nan"), dtype=x.dtype, device=x.device)
    hist_x = x.new_zeros(batch, m, d)
    hist_g = x.new_zeros(batch, m, d)
    gram = torch.zeros(batch, m, m, dtype=torch.float64, device=x.device)
    active = valid.clone()
    for k in range(1, max_iter + 1):
        tx = step(x)
        r = (tx - x).norm(dim=1) / (tx.norm(dim=1) + RESIDUAL_EPS)
        slot, n = (k - 1) % m, min(k, m)
        hist_x[:, slot] = x
        hist_g[:, slot] = tx - x
        # One new row (and column) of the Gram matrix per step: <g_slot, g_j>, dot products in x's dtype.
        row = torch.einsum("bd,bjd->bj", hist_g[:, slot], hist_g[:, :n]).double()
        gram[:, slot, :n] = row
        gram[:, :n, slot] = row
        a = _anderson_weights(gram, n, slot, lam).to(x.dtype)
        mixed = torch.einsum("bj,bjd->bd", a, hist_x[:, :n] + beta * hist_g[:, :n])
        x = torch.where(active[:, None], mixed, x)
        residual = torch.where(active, r, residual)
        iterations = torch.where(active, torch.full_like(iterations, k), iterations)
        active = active & (r > tol) & torch.isfinite(r)
        if not active.any():
            break
    return x, iterations, residual, residual <= tol


def fixed_point_dense_anderson_ref(W, c, z0, activation, m, beta, lam, tol, max_iter):
    """Fixed point of z = act(z W^T + c) by Anderson acceleration.  W: (d, d), c: (batch, d), z0: (batch, d).

    m: history length (1..16), beta: mixing in (0, 1], lam >= 0: regulariser relative to the Gram diagonal
    (scale-invariant: the weights do not change when the residuals are scaled). See _anderson_ref.
    """
    act = get_activation(activation).fn
    return _anderson_ref(lambda z: act(z @ W.T + c), z0, m, beta, lam, tol, max_iter, _finite_rows(W, c, z0))


def fixed_point_dense_anderson_backward_ref(W, c, z, grad_z, activation, m, beta, lam, tol, max_iter):
    """Implicit backward of fixed_point_dense_anderson: the adjoint of fixed_point_dense_backward_ref,
    grad_u = s * (grad_u W + grad_z), s = act'(z W^T + c), solved from 0 by the same Anderson iteration."""
    s = get_activation(activation).derivative(z @ W.T + c)
    valid = _finite_rows(W, c, z, grad_z)
    return _anderson_ref(lambda h: s * (h @ W + grad_z), torch.zeros_like(z), m, beta, lam, tol, max_iter, valid)


# ---------------------------------------------------------------- Anderson acceleration: one fused step
def anderson_step_ref(X_hist, G_hist, H, x, fx, x_next, z_best, residual_best, residual, active, iterations,
                      k, beta, lam, tol):
    """One type-II Anderson step for every active sample, in place (the spec of deqkern::anderson_step).

    X_hist, G_hist: (B, m, n) ring buffers of iterates x_i and residuals g_i = f(x_i) - x_i; H: (B, m, m) their
    Gram matrix G G^T in the accumulation dtype (float32 for half states); x, fx: (B, n) the iterate and f(x);
    x_next, z_best: (B, n); residual_best, residual: (B,) accumulation dtype; active: (B,) bool;
    iterations: (B,) int32; k: steps already taken by the active samples (all active samples share it).

    For an active sample: g = fx - x goes to slot k % m, residual r = ||g|| / (||fx|| + 1e-12), iterations = k + 1,
    and fx becomes z_best if r is the lowest residual so far. The sample stops (active False, x_next = x) once
    r <= tol or r is not finite; otherwise, with nh = min(k + 1, m) stored pairs, the bordered system
        [0  1^T            ] [nu]   [1]
        [1  H + lam_eff I  ] [a ] = [0],   lam_eff = lam * trace(H) / nh   (relative, scale invariant)
    gives the mixing weights (sum a = 1, minimising ||sum a_i g_i||) and x_next = sum_i a_i (x_i + beta g_i).
    A singular system falls back to a plain damped step, x_next = x + beta g. Inactive samples are untouched
    except x_next = x.
    """
    m = X_hist.shape[1]
    acc = H.dtype
    slot, nh = k % m, min(k + 1, m)
    act = active.clone()
    xa, fa = x.to(acc), fx.to(acc)
    g = fa - xa
    r = g.norm(dim=1) / (fa.norm(dim=1) + RESIDUAL_EPS)
    X_hist[:, slot] = torch.where(act[:, None], x, X_hist[:, slot])
    G_hist[:, slot] = torch.where(act[:, None], g.to(G_hist.dtype), G_hist[:, slot])
    residual.copy_(torch.where(act, r, residual))
    iterations.copy_(torch.where(act, torch.full_like(iterations, k + 1), iterations))
    better = act & (torch.isnan(residual_best) | (r < residual_best))
    residual_best.copy_(torch.where(better, r, residual_best))
    z_best.copy_(torch.where(better[:, None], fx, z_best))
    go_on = act & (r > tol) & torch.isfinite(r)
    active.copy_(go_on)

    Xn, Gn = X_hist[:, :nh].to(acc), G_hist[:, :nh].to(acc)
    gram = Gn @ Gn.transpose(1, 2)
    H[:, :nh, :nh] = torch.where(go_on[:, None, None], gram, H[:, :nh, :nh])
    batch = x.shape[0]
    lam_eff = lam * gram.diagonal(dim1=1, dim2=2).sum(dim=1) / nh
    A = torch.zeros(batch, nh + 1, nh + 1, dtype=acc, device=x.device)
    A[:, 0, 1:] = 1
    A[:, 1:, 0] = 1
    A[:, 1:, 1:] = gram + lam_eff[:, None, None] * torch.eye(nh, dtype=acc, device=x.device)
    rhs = torch.zeros(batch, nh + 1, dtype=acc, device=x.device)
    rhs[:, 0] = 1
    solution, info = torch.linalg.solve_ex(A, rhs)
    a = solution[:, 1:]
    ok = (info == 0) & torch.isfinite(a).all(dim=1)
    a = torch.where(ok[:, None], a, torch.nn.functional.one_hot(torch.tensor(slot, device=x.device), nh).to(acc))
    mixed = torch.einsum("bj,bjn->bn", a, Xn + beta * Gn)
    x_next.copy_(torch.where(go_on[:, None], mixed.to(x_next.dtype), x))
