"""Training loops: MeZO, MeZO-SVRG (zo_kernels.optim) and first-order SGD / Adam baselines.

Cost is counted in queries: one query = one forward pass of one example.  Every call of a
loss closure on n examples adds n queries (counted, not assumed), so a MeZO step costs
2·batch, a MeZO-SVRG minibatch step 4·batch and a full (large-batch) step 2·large_batch.
Time is split by wrapping the closures with a timer: forward = time inside closure calls,
noise = the rest of opt.step (perturb, restore, update, anchor swaps).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from .. import distributed as zdist
from .errors import FinetuneError

ZO_METHODS = ("mezo", "mezo-svrg")
FO_METHODS = ("fo-sgd", "fo-adam")
METHODS = ZO_METHODS + FO_METHODS
LABELS = {"mezo": "MeZO", "mezo-svrg": "MeZO-SVRG", "fo-sgd": "FO-SGD", "fo-adam": "FO-Adam"}


@dataclass
class TrainConfig:
    batch_size: int = 64
    queries: int = 19200                 # budget per ZO method (one query = one example's forward pass)
    eps: float = 1e-3
    lr_mezo: float = 2e-3
    lr_svrg: float = 4e-3            # η2: minibatch steps
    lr_svrg_full: float = 2e-2       # η1: full / large-batch steps
    q: int = 2
    large_batch: int = 512           # examples per full step (Remark 3.3: a large batch instead of all)
    anchor: str = "dense"
    lookahead: bool = False
    anneal: bool = False
    kappa: float = 1.05
    alpha: float = 5.0
    weight_decay: float = 0.0
    fo_epochs: float = 5.0
    fo_batch_size: int = 16          # 0: the ZO batch size
    lr_fo_sgd: float = 3e-2
    lr_fo_adam: float = 1e-4
    evals: int = 4                   # evaluation points after the start (test acc + train loss)
    eval_batch: int = 64
    micro_batch: int = 32            # micro-batch of the large-batch / evaluation forward passes
    seed: int = 0
    backend: Optional[str] = None
    rounding: str = "nearest"
    device: str = "cpu"
    distributed: bool = False        # data parallel under torchrun (zo_kernels.distributed)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class TimedClosure:
    """Counts queries and forward time of every call."""

    def __init__(self, fn: Callable[[], torch.Tensor], n_examples: int, meter: "Meter"):
        self.fn, self.n, self.meter = fn, n_examples, meter

    def __call__(self):
        m = self.meter
        _sync(m.device)
        t0 = time.perf_counter()
        out = self.fn()
        _sync(m.device)
        m.forward_s += time.perf_counter() - t0
        m.queries += self.n
        m.calls += 1
        return out


@dataclass
class Meter:
    device: str
    queries: int = 0
    calls: int = 0
    forward_s: float = 0.0


def batch_loss(net, batch: Dict[str, torch.Tensor]):
    """(logits, mean cross-entropy computed in float32).  In bf16/fp16 the model's own loss would be
    rounded to ~3 significant digits, which swamps a ZO step's loss difference l+ - l-."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = net(**inputs).logits
    return logits, torch.nn.functional.cross_entropy(logits.float(), batch["labels"])


def length_sorted_chunks(enc, index, size: int) -> List[List[int]]:
    """Chunks of `index` sorted by length: less padding in micro-batched forward passes."""
    order = sorted(index, key=lambda i: len(enc.ids[i]))
    return [order[i:i + size] for i in range(0, len(order), size)]


def mean_loss(net, enc, index, micro: int) -> torch.Tensor:
    """Mean cross-entropy over `index` (no grad), in length-sorted micro-batches."""
    total = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for chunk in length_sorted_chunks(enc, index, micro):
            _, loss = batch_loss(net, enc.batch(chunk))
            total += loss.double().cpu() * len(chunk)
    return (total / len(index)).float()


def evaluate(net, enc, micro: int) -> Dict[str, float]:
    """Accuracy and mean loss on a whole split."""
    correct, loss = 0, 0.0
    with torch.no_grad():
        for chunk in length_sorted_chunks(enc, range(len(enc)), micro):
            b = enc.batch(chunk)
            logits, lv = batch_loss(net, b)
            correct += int((logits.argmax(-1) == b["labels"]).sum())
            loss += float(lv) * len(chunk)
    return {"acc": correct / len(enc), "loss": loss / len(enc)}


class Sampler:
    """Minibatches from reshuffled epochs (the same order for every method with the same seed)."""

    def __init__(self, n: int, batch: int, seed: int):
        self.n, self.batch = n, min(batch, n)
        self.rng = np.random.default_rng(seed)
        self.perm, self.pos = self.rng.permutation(n), 0

    def next(self) -> List[int]:
        if self.pos + self.batch > self.n:
            self.perm, self.pos = self.rng.permutation(self.n), 0
        ix = self.perm[self.pos:self.pos + self.batch]
        self.pos += self.batch
        return [int(i) for i in ix]

    def large(self, size: int) -> List[int]:
        if size >= self.n:
            return list(range(self.n))
        return [int(i) for i in self.rng.choice(self.n, size=size, replace=False)]


def _import_optim():
    try:
        from .. import optim
    except Exception as e:
        raise FinetuneError(f"zo_kernels.optim does not import ({type(e).__name__}: {e})") from None
    return optim


def make_zo_optimizer(method: str, params, cfg: TrainConfig):
    optim = _import_optim()
    extra = {"distributed": True} if cfg.distributed else {}
    if cfg.backend:
        extra["backend"] = cfg.backend
    if cfg.rounding != "nearest":
        extra["rounding"] = cfg.rounding
    if method == "mezo":
        if not hasattr(optim, "MeZO"):
            raise FinetuneError("zo_kernels.optim has no MeZO")
        return optim.MeZO(params, lr=cfg.lr_mezo, eps=cfg.eps, weight_decay=cfg.weight_decay, seed=cfg.seed,
                          lookahead=cfg.lookahead, **extra)
    if not hasattr(optim, "MeZOSVRG"):
        raise FinetuneError("zo_kernels.optim has no MeZOSVRG")
    return optim.MeZOSVRG(params, lr=cfg.lr_svrg, lr_full=cfg.lr_svrg_full, eps=cfg.eps, q=cfg.q, seed=cfg.seed,
                          anchor=cfg.anchor, weight_decay=cfg.weight_decay, **extra)


def make_annealer(opt, steps_per_epoch: int, cfg: TrainConfig):
    optim = _import_optim()
    if not hasattr(optim, "LossRatioAnnealing"):
        raise FinetuneError("--anneal: zo_kernels.optim has no LossRatioAnnealing")
    return optim.LossRatioAnnealing(opt, steps_per_epoch=steps_per_epoch, kappa=cfg.kappa, alpha=cfg.alpha)


def _is_full_step(opt) -> bool:
    v = getattr(opt, "is_full_step", False)
    return bool(v() if callable(v) else v)


def _as_float(loss) -> float:
    if isinstance(loss, torch.Tensor):
        return float(loss.detach().float().cpu())
    return float(loss)


@dataclass
class RunResult:
    method: str
    steps: int = 0
    queries: int = 0
    train_s: float = 0.0
    eval_s: float = 0.0
    forward_s: float = 0.0
    other_s: float = 0.0             # ZO: noise ops; FO: backward + optimizer update
    backward_s: float = 0.0
    update_s: float = 0.0
    full_steps: int = 0
    step_losses: List[list] = field(default_factory=list)    # [queries, step loss]
    curve: List[dict] = field(default_factory=list)          # eval points
    final: dict = field(default_factory=dict)
    lr_history: List[list] = field(default_factory=list)
    diverged: bool = False


class EvalSchedule:
    """Evaluate test accuracy and full training loss at evenly spaced query counts."""

    def __init__(self, total_queries: int, n_points: int):
        n_points = max(1, n_points)
        self.marks = [round(total_queries * k / n_points) for k in range(1, n_points + 1)]
        self.i = 0

    def due(self, queries: int) -> bool:
        hit = False
        while self.i < len(self.marks) and queries >= self.marks[self.i]:
            self.i += 1
            hit = True
        return hit


def _settle(opt) -> None:
    """MeZO with lookahead leaves the weights at θ+μz between steps: bring them to θ before evaluating."""
    if opt is not None and hasattr(opt, "settle"):
        opt.settle()


def _eval_point(net, data_enc, cfg, res: RunResult, step: int, queries: int, t_train: float, opt=None):
    _settle(opt)
    t0 = time.perf_counter()
    te = evaluate(net, data_enc["test"], cfg.micro_batch)
    tr = float(mean_loss(net, data_enc["train"], range(len(data_enc["train"])), cfg.micro_batch))
    res.eval_s += time.perf_counter() - t0
    res.curve.append({"step": step, "queries": queries, "train_loss": tr, "test_acc": te["acc"],
                      "test_loss": te["loss"], "train_s": t_train})
    return tr, te


def run_zo(method: str, net, trainable, data_enc, cfg: TrainConfig, start_point: dict, progress=True) -> RunResult:
    from tqdm.auto import tqdm

    train = data_enc["train"]
    res = RunResult(method)
    res.curve.append(dict(start_point))
    opt = make_zo_optimizer(method, trainable, cfg)
    steps_per_epoch = max(1, len(train) // cfg.batch_size)
    annealer = make_annealer(opt, steps_per_epoch, cfg) if cfg.anneal else None
    sampler = Sampler(len(train), cfg.batch_size, cfg.seed)
    meter = Meter(cfg.device)
    sched = EvalSchedule(cfg.queries, cfg.evals)
    large = min(cfg.large_batch, len(train))
    bar = tqdm(total=cfg.queries, desc=LABELS[method], unit="q", disable=not progress, dynamic_ncols=True,
               leave=True, mininterval=1.0)
    t_train, step = 0.0, 0
    while True:
        full = method == "mezo-svrg" and _is_full_step(opt)
        if method == "mezo":
            cost = 2 * cfg.batch_size
        else:
            cost = 2 * large if full else 4 * cfg.batch_size
        if meter.queries + cost > cfg.queries:
            break
        idx = sampler.next()
        # Data parallel: this rank's share of the step's batch; queries count the whole batch.
        mine = zdist.shard_list(idx) if cfg.distributed else idx
        batch = train.batch(mine)
        closure = TimedClosure(lambda: (batch_loss(net, batch)[1], len(mine)), len(idx), meter)
        q0, f0 = meter.queries, meter.forward_s
        _sync(cfg.device)
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                if method == "mezo":
                    loss = opt.step(closure)
                else:
                    full_closure = None
                    if full:
                        lidx = sampler.large(large)
                        lmine = zdist.shard_list(lidx) if cfg.distributed else lidx
                        full_closure = TimedClosure(
                            lambda: (mean_loss(net, train, lmine, cfg.micro_batch).to(cfg.device), len(lmine)),
                            len(lidx), meter)
                    loss = opt.step(closure, full_closure=full_closure)
        except FloatingPointError:  # zo_kernels.optim.NonFiniteLossError: θ restored, the run has diverged
            loss = float("nan")
        _sync(cfg.device)
        dt = time.perf_counter() - t0
        t_train += dt
        res.other_s += dt - (meter.forward_s - f0)
        loss = _as_float(loss)
        step += 1
        res.full_steps += int(full)
        res.step_losses.append([meter.queries, loss, int(full)])
        if annealer is not None:
            annealer.step(loss)
            res.lr_history.append([step, float(opt.param_groups[0]["lr"])])
        bar.update(meter.queries - q0)
        bar.set_postfix_str(f"loss={loss:.4f} step={step}", refresh=False)
        if not math.isfinite(loss):
            res.diverged = True
            break
        if sched.due(meter.queries):
            bar.clear()
            tr, te = _eval_point(net, data_enc, cfg, res, step, meter.queries, t_train, opt)
            bar.set_postfix_str(f"loss={loss:.4f} step={step} train={tr:.4f} test_acc={te['acc']:.3f}")
    bar.close()
    _settle(opt)
    if not res.curve or res.curve[-1]["queries"] != meter.queries:
        _eval_point(net, data_enc, cfg, res, step, meter.queries, t_train, opt)
    res.steps, res.queries, res.train_s, res.forward_s = step, meter.queries, t_train, meter.forward_s
    return res


def run_fo(method: str, net, trainable, data_enc, cfg: TrainConfig, start_point: dict, progress=True) -> RunResult:
    from tqdm.auto import tqdm

    train = data_enc["train"]
    res = RunResult(method)
    res.curve.append(dict(start_point))
    if method == "fo-sgd":
        opt = torch.optim.SGD(trainable, lr=cfg.lr_fo_sgd, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.Adam(trainable, lr=cfg.lr_fo_adam, weight_decay=cfg.weight_decay)
    bs = min(cfg.fo_batch_size or cfg.batch_size, len(train))
    n_steps = max(1, int(round(cfg.fo_epochs * len(train) / bs)))
    total_q = n_steps * bs
    sampler = Sampler(len(train), bs, cfg.seed)
    sched = EvalSchedule(total_q, cfg.evals)
    bar = tqdm(total=total_q, desc=LABELS[method], unit="q", disable=not progress, dynamic_ncols=True,
               leave=True, mininterval=1.0)
    t_train, queries = 0.0, 0
    for step in range(1, n_steps + 1):
        batch = train.batch(sampler.next())
        _sync(cfg.device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = batch_loss(net, batch)[1]
        _sync(cfg.device)
        t1 = time.perf_counter()
        loss.backward()
        _sync(cfg.device)
        t2 = time.perf_counter()
        opt.step()
        _sync(cfg.device)
        t3 = time.perf_counter()
        res.forward_s += t1 - t0
        res.backward_s += t2 - t1
        res.update_s += t3 - t2
        t_train += t3 - t0
        queries += bs
        lv = float(loss.detach())
        res.step_losses.append([queries, lv, 0])
        bar.update(bs)
        bar.set_postfix_str(f"loss={lv:.4f} step={step}", refresh=False)
        if not math.isfinite(lv):
            res.diverged = True
            break
        if sched.due(queries):
            bar.clear()
            tr, te = _eval_point(net, data_enc, cfg, res, step, queries, t_train)
            bar.set_postfix_str(f"loss={lv:.4f} step={step} train={tr:.4f} test_acc={te['acc']:.3f}")
    bar.close()
    opt.zero_grad(set_to_none=True)
    if res.curve[-1]["queries"] != queries:
        _eval_point(net, data_enc, cfg, res, step, queries, t_train)
    res.steps, res.queries, res.train_s = step, queries, t_train
    res.other_s = res.backward_s + res.update_s
    return res


def run_method(method: str, net, trainable, data_enc, cfg: TrainConfig, start_point: dict,
               progress: bool = True) -> RunResult:
    if method in ZO_METHODS:
        res = run_zo(method, net, trainable, data_enc, cfg, start_point, progress)
    elif method in FO_METHODS:
        res = run_fo(method, net, trainable, data_enc, cfg, start_point, progress)
    else:
        raise FinetuneError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    t0 = time.perf_counter()
    val = evaluate(net, data_enc["val"], cfg.micro_batch)
    res.eval_s += time.perf_counter() - t0
    last = res.curve[-1]
    res.final = {"train_loss": last["train_loss"], "test_acc": last["test_acc"], "test_loss": last["test_loss"],
                 "val_acc": val["acc"], "val_loss": val["loss"]}
    return res
