"""The algorithms as the papers write them, without the fused primitive or the bookkeeping: the oracle
the optimizers are tested against (like flash-linear-attention's `naive.py`), and the baselines the
benchmarks time.

Two kinds of function:
* `mezo`, `mezo_svrg`: functional transcriptions of the papers' algorithms.  Weights are lists of
  tensors (pass float64 for a float64 truth); `loss(theta, batch) -> float` evaluates a point, with
  batch None meaning the full batch; `noise(t) -> [z_i]` gives step t's noise tensors (materialise
  zo-noise v1 with `zo_kernels.noise.normal`, or use `noise_of`).  Each returns (θ_T, per-step losses).
* `mezo_published_step`, `mezo_svrg_published_step`: one step as the published code performs it,
  in place in the weights' dtype — every noise touch a separate out-of-place op on a temporary z —
  for comparisons of precision (bf16 drift) and speed.

Nothing here calls `zo_kernels.noise_axpy_`.
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence

import torch

from ..noise import normal, step_key

Loss = Callable[[List[torch.Tensor], object], float]
Noise = Callable[[int], List[torch.Tensor]]


def noise_of(seed: int, shapes: Sequence, ids: Optional[Sequence[int]] = None,
             dtype: torch.dtype = torch.float32) -> Noise:
    """noise(t): zo-noise v1 tensors of step t (key step_key(seed, t); tensor i has id ids[i], default i)."""
    def noise(t: int) -> List[torch.Tensor]:
        k = step_key(seed, t)
        tids = range(len(shapes)) if ids is None else ids
        return [normal(k, i, math.prod(s), dtype=dtype).view(s) for i, s in zip(tids, shapes)]
    return noise


def spsa(theta, z, mu, loss: Loss, batch, mus=None):
    """Two-point estimate at theta along z: ((l+ − l−)/2, (l+ + l−)/2), tensor i perturbed by μ_i z_i."""
    mus = mus or [mu] * len(theta)
    lp = loss([p + m * zi for p, zi, m in zip(theta, z, mus)], batch)
    lm = loss([p - m * zi for p, zi, m in zip(theta, z, mus)], batch)
    return (lp - lm) / 2, (lp + lm) / 2


# ---------------------------------------------------------------------------------------- MeZO
def mezo(theta, loss: Loss, batches, *, lr, mu, noise: Noise, wd=0.0, steps=None, lrs=None, mus=None, wds=None):
    """MeZO (Malladi et al. 2023), Algorithm 1: g = (L(θ+μz) − L(θ−μz)) / 2μ;  θ ← θ − η(g z + λθ).

    Per-tensor lrs / mus / wds give the per-group variant: perturb tensor i by μ_i z_i and use
    g_i = (L+ − L−) / (2 μ_i) for it; a tensor with lr None is frozen (neither perturbed nor updated)."""
    n = len(theta)
    lrs, mus, wds = lrs or [lr] * n, mus or [mu] * n, wds or [wd] * n
    losses = []
    for t in range(len(batches) if steps is None else steps):
        z = [zi if e is not None else torch.zeros_like(zi) for zi, e in zip(noise(t), lrs)]
        d, mean = spsa(theta, z, mu, loss, batches[t], mus)
        theta = [p if e is None else p - e * (d / m * zi + w * p) for p, zi, e, m, w in zip(theta, z, lrs, mus, wds)]
        losses.append(mean)
    return theta, losses


def lezo(theta, loss: Loss, batches, *, lr, mu, noise: Noise, keep: Callable[[int], set], wd=0.0, steps=None):
    """LeZO (Wang et al. 2024): MeZO on the tensors keep(t) of step t only -- the others are neither
    perturbed nor updated (nor decayed): θ_i ← θ_i − η(g z_i + λθ_i) for i in keep(t), no 1/ρ rescaling."""
    losses = []
    for t in range(len(batches) if steps is None else steps):
        kept = keep(t)
        z = [zi if i in kept else torch.zeros_like(zi) for i, zi in enumerate(noise(t))]
        d, mean = spsa(theta, z, mu, loss, batches[t])
        theta = [p - lr * (d / mu * zi + wd * p) if i in kept else p for i, (p, zi) in enumerate(zip(theta, z))]
        losses.append(mean)
    return theta, losses


def mezo_published_step(params, z, closure: Callable[[], float], *, lr, mu, wd=0.0) -> float:
    """One step as MeZO's code does it, in place: perturb(+1), loss1; perturb(−2), loss2; perturb(+1);
    θ ← θ − η(g z + λθ).  Each touch is `p.data = p.data + c·z` in p's dtype (z cast to it)."""
    def touch(c):
        for p, zi in zip(params, z):
            p.data = p.data + c * zi.to(p.dtype)

    touch(mu)
    lp = float(closure())
    touch(-2 * mu)
    lm = float(closure())
    touch(mu)
    g = (lp - lm) / (2 * mu)
    for p, zi in zip(params, z):    # MeZO's code leaves the weight-decay term out when λ = 0 (and for biases)
        p.data = p.data - lr * (g * zi.to(p.dtype) + wd * p.data) if wd else p.data - lr * (g * zi.to(p.dtype))
    return (lp + lm) / 2


# ----------------------------------------------------------------------------------- MeZO-SVRG
def mezo_svrg(theta, loss: Loss, batches, *, lr1, lr2, mu, q, noise: Noise, wd=0.0, steps=None):
    """MeZO-SVRG (Gautam et al., ICML 2024), Algorithm 1: every q steps g = ∇̂f(θ) over the full
    batch, θ̄ ← θ, θ ← θ − η1 g; otherwise θ ← θ − η2 (∇̂f_I(θ) − ∇̂f_I(θ̄) + g), both minibatch
    estimates with the same z.  ∇̂f_I(θ) = (f_I(θ+μz) − f_I(θ−μz)) / 2μ · z.  Weight decay: + λθ in
    the bracket.  Returns (θ_T, losses): (l+ + l−)/2 of the full batch on full steps, else of the minibatch."""
    losses = []
    for t in range(len(batches) if steps is None else steps):
        z = noise(t)
        if t % q == 0:
            d, mean = spsa(theta, z, mu, loss, None)
            ca, za, bar = d / mu, z, theta
            theta = [p - lr1 * (ca * zi + wd * p) for p, zi in zip(theta, za)]
        else:
            d1, mean = spsa(theta, z, mu, loss, batches[t])
            d2, _ = spsa(bar, z, mu, loss, batches[t])
            theta = [p - lr2 * ((d1 - d2) / mu * zi + ca * zai + wd * p) for p, zi, zai in zip(theta, z, za)]
        losses.append(mean)
    return theta, losses


def mezo_svrg_published_step(params, t: int, z, closure, full_closure, state: dict, *, lr, lr_full, mu, q,
                             za_of: Callable[[], List[torch.Tensor]]) -> float:
    """One MeZO-SVRG step as the published code does it, in place: a dense anchor copy, every touch a
    separate op.  `state` carries the anchor and c_a between calls; za_of() gives z_a again."""
    def touch(c, zs):
        for p, zi in zip(params, zs):
            p.data = p.data + c * zi.to(p.dtype)

    def two_point(f):
        touch(mu, z)
        lp = float(f())
        touch(-2 * mu, z)
        lm = float(f())
        touch(mu, z)
        return lp, lm

    if t % q == 0:
        state["anchor"] = [p.data.clone() for p in params]
        lp, lm = two_point(full_closure)
        state["ca"] = (lp - lm) / (2 * mu)
        touch(-lr_full * state["ca"], z)
        return (lp + lm) / 2
    l1p, l1m = two_point(closure)
    cur = [p.data for p in params]
    for p, a in zip(params, state["anchor"]):
        p.data = a
    l2p, l2m = two_point(closure)
    state["anchor"] = [p.data for p in params]
    for p, c in zip(params, cur):
        p.data = c
    touch(-lr * ((l1p - l1m) - (l2p - l2m)) / (2 * mu), z)
    touch(-lr * state["ca"], za_of())
    return (l1p + l1m) / 2


# ------------------------------------------------------------------ ZO-Bench's family (Zhang et al. 2024)
DirNoise = Callable[[int, int], List[torch.Tensor]]      # noise(t, j): z of direction j of step t


def spsa_directions(theta, loss: Loss, batch, t: int, q: int, mu: float, noise: DirNoise):
    """The q two-point estimates of step t: [(d_j, z_j, (l+_j + l−_j)/2)], d_j = (l+_j − l−_j)/2."""
    out = []
    for j in range(q):
        z = noise(t, j)
        d, mean = spsa(theta, z, mu, loss, batch)
        out.append((d, z, mean))
    return out


def _axpy(theta, coef_z, lr: float, wd: float = 0.0):
    """(1 − ηλ)θ + Σ c·z over (c, z) pairs."""
    return [(1 - lr * wd) * p + sum(c * z[i] for c, z in coef_z) for i, p in enumerate(theta)]


def sign_sgd(theta, loss: Loss, batches, *, lr, mu, q, noise: DirNoise, wd=0.0, steps=None):
    """ZO-Bench zo_sign_opt: grad = sign(projected_grad)·z (averaged over q); θ ← θ − η(grad + λθ)."""
    for t in range(len(batches) if steps is None else steps):
        dz = spsa_directions(theta, loss, batches[t], t, q, mu, noise)
        theta = _axpy(theta, [(-lr * math.copysign(1.0, d) / q if d else 0.0, z) for d, z, _ in dz], lr, wd)
    return theta


def n_spsa(theta, loss: Loss, batches, *, lr, mu, q, noise: DirNoise, wd=0.0, steps=None):
    """ZO-Bench zo_step_v2 (q > 1): ĝ = (1/q) Σ_j (l+_j − l−_j)/(2μ) z_j;  θ ← θ − η(ĝ + λθ)."""
    for t in range(len(batches) if steps is None else steps):
        dz = spsa_directions(theta, loss, batches[t], t, q, mu, noise)
        theta = _axpy(theta, [(-lr * d / (mu * q), z) for d, z, _ in dz], lr, wd)
    return theta


def momentum_sgd(theta, loss: Loss, batches, *, lr, mu, beta, noise: DirNoise, q=1, steps=None, window=None):
    """torch.optim.SGD(momentum=β) with p.grad = ĝ (ZO-Bench zo_sgd + momentum): m ← βm + ĝ; θ ← θ − ηm.
    window=K: the momentum truncated to the last K estimates (the seeded mode's definition)."""
    hist = []
    for t in range(len(batches) if steps is None else steps):
        dz = spsa_directions(theta, loss, batches[t], t, q, mu, noise)
        hist.append([(d / (mu * q), z) for d, z, _ in dz])
        recent = hist if window is None else hist[-window:]
        n = len(recent)
        theta = _axpy(theta, [(-lr * beta ** (n - 1 - s) * c, z) for s, h in enumerate(recent) for c, z in h], lr)
    return theta


def adam(theta, loss: Loss, batches, *, lr, mu, noise: DirNoise, q=1, steps=None, betas=(0.9, 0.999), eps=1e-8,
         wd=0.0):
    """ZO-Bench zo_adam: torch.optim.Adam (in theta's dtype) with p.grad = ĝ."""
    ps = [p.clone().requires_grad_(False) for p in theta]
    opt = torch.optim.Adam(ps, lr=lr, betas=betas, eps=eps, weight_decay=wd)
    for t in range(len(batches) if steps is None else steps):
        dz = spsa_directions(ps, loss, batches[t], t, q, mu, noise)
        for i, p in enumerate(ps):
            p.grad = sum(d / (mu * q) * z[i] for d, z, _ in dz)
        opt.step()
    return ps


def cons(theta, loss: Loss, batches, *, lr, mu, noise: DirNoise, q=1, steps=None):
    """ZO-Bench zo_conserv_step: l0 = f(θ); candidates θ ∓ ηĝ; keep the lowest of the three.
    Returns (θ_T, the index kept at each step: 0 θ, 1 θ − ηĝ, 2 θ + ηĝ)."""
    choices = []
    for t in range(len(batches) if steps is None else steps):
        batch = batches[t]
        l0 = loss(theta, batch)
        dz = spsa_directions(theta, loss, batch, t, q, mu, noise)
        minus = _axpy(theta, [(-lr * d / (mu * q), z) for d, z, _ in dz], lr)
        plus = _axpy(theta, [(lr * d / (mu * q), z) for d, z, _ in dz], lr)
        ls = [l0, loss(minus, batch), loss(plus, batch)]
        best = min(range(3), key=lambda i: (ls[i], i))
        choices.append(best)
        theta = [theta, minus, plus][best]
    return theta, choices


def forward_grad(theta, loss_tensor: Callable, batches, *, lr, noise: DirNoise, wd=0.0, steps=None):
    """Forward gradient with the directional derivative from backward-mode autograd (an independent
    route): θ ← θ − η((∇f·z) z + λθ).  loss_tensor(theta, batch) returns the loss as a tensor."""
    for t in range(len(batches) if steps is None else steps):
        z = noise(t, 0)
        ps = [p.clone().requires_grad_(True) for p in theta]
        loss_tensor(ps, batches[t]).backward()
        dd = sum((p.grad * zi).sum() for p, zi in zip(ps, z)).item()
        theta = _axpy(theta, [(-lr * dd, z)], lr, wd)
    return theta


# ------------------------------------------------------------------------------ FZOO (Dang et al. 2025)
def fzoo(theta, loss: Loss, batches, *, lr, mu, n, noise: DirNoise, wd=0.0, steps=None):
    """The authors' zo_step / zo_update (DKmiyan/FZOO, trainer.py): l_i = L(θ + μz_i) for the N
    directions (each perturbation undone before the next), l_0 = L(θ);
    projected_grad_i = (l_i − l_0) / (N·std(l_1 … l_N, unbiased=False));  θ ← θ − η(Σ_i projected_grad_i z_i + λθ)
    (the authors apply no weight decay: λ = 0 is their update).  Equal losses (std 0): no gradient
    move, where the authors' code would divide by zero.  Returns (θ_T, the l_0 of each step)."""
    clean = []
    for t in range(len(batches) if steps is None else steps):
        batch = batches[t]
        zs = [noise(t, i) for i in range(n)]
        ls = torch.tensor([loss([p + mu * zi for p, zi in zip(theta, z)], batch) for z in zs], dtype=torch.float64)
        l0 = loss(theta, batch)
        std = ls.std(unbiased=False)
        grads = [0.0] * n if bool((ls == ls[0]).all()) else ((ls - l0) / (n * std)).tolist()
        theta = _axpy(theta, [(-lr * g, z) for g, z in zip(grads, zs)], lr, wd)
        clean.append(l0)
    return theta, clean


# ------------------------------------------------------------------------------ LOZO (Chen et al. 2025)
def lozo(theta, loss: Loss, batches, *, lr, mu, wd=0.0, seed: int, rank: int, nu: int, beta=None, steps=None):
    """The authors' loop (optsuite/LOZO, LOZOtrainer) in theta's dtype, U and V materialised from the
    spec's low-rank noise: perturb +μZ, −2μZ, +μZ; c = (l1 − l2)/2μ; then
    LOZO:   θ ← θ − η(c Z + λθ)
    LOZO-M: matrices: at t % ν == 0, M ← β M V_oldᵀ V / n + (1−β) c U (M = c U at t = 0); else
            M ← β M + (1−β) c U;  θ ← θ − η(M Vᵀ + λθ).  Vectors: m ← β m + (1−β) c z (m = c z at t = 0).
    Z = U Vᵀ for tensors with ndim ≥ 2 (U from step_key(seed, t), V from step_key(seed, ν⌊t/ν⌋)), z otherwise."""
    from .. import lowrank as L

    def u_of(t, shape, tid):
        return L.lowrank_u(step_key(seed, t), tid, shape[0], rank, dtype=torch.float64)

    def v_of(t, shape, tid):
        return L.lowrank_v(step_key(seed, nu * (t // nu)), tid, L.cols_of(shape), rank, dtype=torch.float64)

    def z_of(t, shape, tid):
        if len(shape) >= 2:
            return (u_of(t, shape, tid) @ v_of(t, shape, tid).T).view(shape)
        return L.lowrank_noise(step_key(seed, t), 0, tid, shape, rank)

    theta = [p.double().clone() for p in theta]
    mom = [None] * len(theta)
    for t in range(len(batches) if steps is None else steps):
        zs = [z_of(t, p.shape, i) for i, p in enumerate(theta)]
        d, _ = spsa(theta, zs, mu, loss, batches[t])
        c = d / mu
        for i, p in enumerate(theta):
            if beta is None:
                step = c * zs[i]
            elif p.dim() >= 2:
                u, v = u_of(t, p.shape, i), v_of(t, p.shape, i)
                if t == 0:
                    mom[i] = c * u
                elif t % nu == 0:
                    v_old = v_of(t - 1, p.shape, i)
                    mom[i] = beta * mom[i] @ v_old.T @ v / v.shape[0] + (1 - beta) * c * u
                else:
                    mom[i] = beta * mom[i] + (1 - beta) * c * u
                step = (mom[i] @ v.T).view(p.shape)
            else:
                mom[i] = c * zs[i] if t == 0 else beta * mom[i] + (1 - beta) * c * zs[i]
                step = mom[i]
            theta[i] = p - lr * (step + wd * p)
    return theta


# ------------------------------------------------------------------- HiZOO (Zhao et al., ICLR 2025)
def hizoo(theta, loss: Loss, batches, *, lr, mu, noise: Noise, smoothing: Callable[[int], float], wd=0.0,
          steps=None):
    """The authors' zo_Hessian_step_update (Yanjun-Zhao/HiZOO, trainer.py), in its order, on a diagonal
    Hessian h (1 at the start): l0 = L(θ); l+ = L(θ + μz/√h); l− = L(θ − μz/√h);
    h ← (1 − a)h + |l+ + l− − 2·l0|·h·z²·a/(2μ²);  θ ← θ − η((l+ − l−)/(2μ)·z/√h + λθ) with the new h.
    smoothing(t) is a of step t.  Returns (θ_T, h_T, the l0 of each step)."""
    h = [torch.ones_like(p) for p in theta]
    clean = []
    for t in range(len(batches) if steps is None else steps):
        batch, z, a = batches[t], noise(t), smoothing(t)
        l0 = loss(theta, batch)
        lp = loss([p + mu * zi / torch.sqrt(hi) for p, zi, hi in zip(theta, z, h)], batch)
        lm = loss([p - mu * zi / torch.sqrt(hi) for p, zi, hi in zip(theta, z, h)], batch)
        h = [(1 - a) * hi + abs(lp + lm - 2 * l0) * hi * zi * zi * a / (2 * mu * mu) for hi, zi in zip(h, z)]
        theta = [p - lr * ((lp - lm) / (2 * mu) * zi / torch.sqrt(hi) + wd * p) for p, zi, hi in zip(theta, z, h)]
        clean.append(l0)
    return theta, h, clean
