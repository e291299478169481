"""Training loops and the method registry: MeZO, MeZO-SVRG (zo_kernels.optim) and first-order
SGD / Adam baselines.

Cost is counted in queries: one query = one forward pass of one example.  Every call of a
loss closure on n examples adds n queries (counted, not assumed), so a MeZO step costs
2·batch, a MeZO-SVRG minibatch step 4·batch and a full (large-batch) step 2·large_batch.
Forward gradient is charged `fg_query_cost` (default 2) queries per example of its one jvp:
the jvp carries the primal and a tangent through every layer (each linear layer computes
W·x, W·ẋ and Ẇ·x: two to three forward passes' arithmetic), and at 2 it takes exactly MeZO's
steps on MeZO's batches, so "equal queries" compares one exact directional derivative with
one finite-difference estimate of it, per step, and never gives the jvp more compute than
MeZO's two forwards.  ZO-Bench's count (one forward with jvp = 1) is `fg_query_cost=1`.
Time is split by wrapping the closures with a timer: forward = time inside closure calls,
noise = the rest of opt.step (perturb, restore, update, anchor swaps).

Adding a method: one `register(Method(...))` call at the bottom of this file (or in your own
module, imported before the CLI parses --methods).  A ZO method gives a `make_optimizer(params,
cfg)` whose optimizer has `step(closure)` (closure: forward only, returns (loss, n_local)) and
a `step_cost(opt, cfg, large)` = the queries its next step will spend (checked against the
budget before the step).  An optimizer with an `is_full_step` attribute/method gets a
`full_closure` (the large-batch loss) on the steps where it is true, as MeZO-SVRG does.  It
should have `state_dict()/load_state_dict()` that resume bit-identically (checkpoints).
A method whose optimizer runs the model itself (forward-grad: torch.func.jvp through the
module) sets `needs_module` and gets `make_optimizer(params, cfg, module=net)`; one that
differentiates its objective sets `differentiates` and is given cross-entropy whatever
--objective says (as the FO baselines are).
An FO method gives a torch.optim.Optimizer; the loop does forward + backward + step.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from .. import distributed as zdist
from .errors import FinetuneError

OBJECTIVES = ("loss", "accuracy")
LR_SCHEDULES = ("constant", "linear", "cosine")


def lr_factor(schedule: str, frac: float) -> float:
    """The learning-rate multiplier after `frac` of the budget (0 -> 1): Hugging Face's linear and
    cosine decays to 0 without warm-up, driven by queries spent so every method decays alike.
    A ZO step's update noise is ~lr**2 * d; decaying lr stops the late drift a constant rate shows."""
    frac = min(max(frac, 0.0), 1.0)
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return 1.0 - frac
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * frac))
    raise FinetuneError(f"unknown lr schedule {schedule!r}; choose from {', '.join(LR_SCHEDULES)}")


class LRSchedule:
    """Sets every `lr*` entry of every param group to base * lr_factor(queries / total).  The bases
    are read from the freshly built optimizer, so a resumed run (whose loaded param groups hold
    already-scaled rates) recomputes the same rates from its query count."""

    def __init__(self, opt, schedule: str, total: int):
        lr_factor(schedule, 0.0)    # validates the name
        self.opt, self.schedule, self.total = opt, schedule, max(1, total)
        self.bases = [{k: g[k] for k in g if k.startswith("lr")} for g in opt.param_groups]

    def apply(self, queries: int) -> float:
        f = lr_factor(self.schedule, queries / self.total)
        for g, base in zip(self.opt.param_groups, self.bases):
            for k, v in base.items():
                g[k] = v * f
        return f


@dataclass
class TrainConfig:
    batch_size: int = 16
    queries: int = 19200                 # budget per ZO method (one query = one example's forward pass)
    eps: float = 1e-3
    lr_mezo: float = 1e-4
    lr_svrg: float = 1e-4            # η2: minibatch steps
    lr_svrg_full: float = 5e-4       # η1: full / large-batch steps
    q: int = 4
    large_batch: int = 128           # examples per full step (Remark 3.3: a large batch instead of all)
    anchor: str = "dense"
    lookahead: bool = False
    anneal: bool = False
    lr_schedule: str = "constant"    # learning-rate factor over the budget: constant, linear or cosine (to 0)
    kappa: float = 1.05
    alpha: float = 5.0
    weight_decay: float = 0.0
    fo_epochs: float = 2.0
    fo_batch_size: int = 16          # 0: the ZO batch size
    lr_fo_sgd: float = 1e-2
    lr_fo_adam: float = 1e-5
    # Per-method lrs of the other ZO methods; None: derived from lr_mezo (the registry below, docs/zo_bench.md)
    lr_n_spsa: Optional[float] = None
    lr_zo_sgd_sign: Optional[float] = None
    lr_zo_sgd_cons: Optional[float] = None
    lr_zo_sgd_mmt: Optional[float] = None          # zo-sgd-mmt and zo-sgd-mmt-dense
    lr_zo_adam: Optional[float] = None
    lr_lozo: Optional[float] = None                # lozo and lozo-m
    lr_forward_grad: Optional[float] = None
    fg_query_cost: int = 2           # queries per example of one forward-grad jvp (module docstring)
    lozo_rank: int = 2               # lozo and lozo-m: rank r of U Vᵀ
    lozo_nu: int = 10                # lozo and lozo-m: V is kept ν steps (tuned here; the paper's 50: docs/lozo.md)
    evals: int = 8                   # evaluation points after the start (test acc + train loss)
    eval_train: int = 512            # training examples in the eval points' train loss (0: all)
    eval_batch: int = 64
    micro_batch: int = 64            # micro-batch of the large-batch / evaluation forward passes
    objective: str = "loss"          # ZO methods: "loss" (cross-entropy) or "accuracy" (minibatch error rate)
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


def batch_objective(net, batch: Dict[str, torch.Tensor], objective: str) -> torch.Tensor:
    """What a ZO method minimises on a batch: cross-entropy, or the error rate 1 - accuracy (not
    differentiable, piecewise constant: MeZO's claim 4 is that ZO can optimise it directly)."""
    logits, loss = batch_loss(net, batch)
    if objective == "accuracy":
        return 1.0 - (logits.argmax(-1) == batch["labels"]).float().mean()
    return loss


def length_sorted_chunks(enc, index, size: int) -> List[List[int]]:
    """Chunks of `index` sorted by length: less padding in micro-batched forward passes."""
    order = sorted(index, key=lambda i: len(enc.ids[i]))
    return [order[i:i + size] for i in range(0, len(order), size)]


def mean_loss(net, enc, index, micro: int, objective: str = "loss") -> torch.Tensor:
    """Mean objective (default cross-entropy) over `index` (no grad), in length-sorted micro-batches."""
    total = torch.zeros((), dtype=torch.float64)
    index = list(index)
    with torch.no_grad():
        for chunk in length_sorted_chunks(enc, index, micro):
            loss = batch_objective(net, enc.batch(chunk), objective)
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

    # Checkpoints: the data order is the permutation, the position in it and the generator's state.
    def state_dict(self) -> dict:
        return {"perm": torch.as_tensor(self.perm, dtype=torch.int64), "pos": int(self.pos),
                "rng": _rng_state_to_str(self.rng)}

    def load_state_dict(self, sd: dict) -> None:
        self.perm, self.pos = sd["perm"].numpy().astype(np.int64), int(sd["pos"])
        self.rng.bit_generator.state = _rng_state_from_str(sd["rng"])


def _rng_state_to_str(rng) -> str:
    import json

    return json.dumps(rng.bit_generator.state)      # big ints as text: loads with weights_only=True


def _rng_state_from_str(s: str) -> dict:
    import json

    return json.loads(s)


def _import_optim():
    try:
        from .. import optim
    except Exception as e:
        raise FinetuneError(f"zo_kernels.optim does not import ({type(e).__name__}: {e})") from None
    return optim


def _zo_extra(cfg: TrainConfig) -> dict:
    extra = {"distributed": True} if cfg.distributed else {}
    if cfg.backend:
        extra["backend"] = cfg.backend
    if cfg.rounding != "nearest":
        extra["rounding"] = cfg.rounding
    return extra


def _make_mezo(params, cfg: TrainConfig):
    optim = _import_optim()
    return optim.MeZO(params, lr=cfg.lr_mezo, eps=cfg.eps, weight_decay=cfg.weight_decay, seed=cfg.seed,
                      lookahead=cfg.lookahead, **_zo_extra(cfg))


def _make_mezo_svrg(params, cfg: TrainConfig):
    optim = _import_optim()
    return optim.MeZOSVRG(params, lr=cfg.lr_svrg, lr_full=cfg.lr_svrg_full, eps=cfg.eps, q=cfg.q, seed=cfg.seed,
                          anchor=cfg.anchor, weight_decay=cfg.weight_decay, **_zo_extra(cfg))


def _is_full_step(opt) -> bool:
    v = getattr(opt, "is_full_step", False)
    return bool(v() if callable(v) else v)


@dataclass(frozen=True)
class Method:
    """One entry of the registry (see the module docstring)."""
    name: str                        # the --methods name
    label: str                       # table / plot label
    kind: str                        # "zo" or "fo"
    make_optimizer: Callable         # (params, cfg) -> optimizer
    step_cost: Optional[Callable] = None   # ZO: (opt, cfg, large) -> queries of the next step
    color: Optional[str] = None
    needs_module: bool = False       # make_optimizer(params, cfg, module=net)
    differentiates: bool = False     # minimises cross-entropy whatever cfg.objective (it needs a derivative)
    query_cost: Optional[Callable] = None  # cfg -> queries per example of one closure call (None: 1)

    def build(self, net: torch.nn.Module, params, cfg: "TrainConfig"):
        """This method's optimizer over `params` (the trainable parameters of `net`)."""
        if self.needs_module:
            return self.make_optimizer(params, cfg, module=net)
        return self.make_optimizer(params, cfg)

    def queries_per_example(self, cfg: "TrainConfig") -> int:
        return 1 if self.query_cost is None else int(self.query_cost(cfg))

    def objective(self, cfg: "TrainConfig") -> str:
        return "loss" if self.differentiates else cfg.objective


METHODS: Dict[str, Method] = {}


def register(m: Method) -> Method:
    if m.kind not in ("zo", "fo"):
        raise ValueError(f"method {m.name}: kind must be 'zo' or 'fo', got {m.kind!r}")
    if m.kind == "zo" and m.step_cost is None:
        raise ValueError(f"method {m.name}: a ZO method needs step_cost")
    METHODS[m.name] = m
    return m


register(Method("mezo", "MeZO", "zo", _make_mezo, lambda opt, cfg, large: 2 * cfg.batch_size, "tab:blue"))
register(Method("mezo-svrg", "MeZO-SVRG", "zo", _make_mezo_svrg,
                lambda opt, cfg, large: 2 * large if _is_full_step(opt) else 4 * cfg.batch_size, "tab:red"))
register(Method("fo-sgd", "FO-SGD", "fo",
                lambda params, cfg: torch.optim.SGD(params, lr=cfg.lr_fo_sgd, weight_decay=cfg.weight_decay),
                color="tab:green"))
register(Method("fo-adam", "FO-Adam", "fo",
                lambda params, cfg: torch.optim.Adam(params, lr=cfg.lr_fo_adam, weight_decay=cfg.weight_decay),
                color="tab:purple"))



# The scale of the minibatch gradient at the default start, rms over batches of |∇f_B| (= rms of
# MeZO's coefficient c = (f+ − f−)/2μ ≈ ∇f_B·z): all-MiniLM-L6-v2, description head (T = 0.05),
# Rotten Tomatoes, batch 16, max 64 tokens, full fine-tuning, seed 0 (docs/zo_bench.md).  Sign and
# Adam normalise the step by it, so their lr is MeZO's times it; another setting has another scale.
GRAD_SCALE = 5.0
MMT_BETA = 0.9


def _lr(name: str, derived: Callable[[TrainConfig], float]) -> Callable[[TrainConfig], float]:
    """lr(cfg): the method's --lr-* flag (TrainConfig field `name`) if given, else `derived` from MeZO's
    lr by matching the method's update to MeZO's (docs/zo_bench.md, "Default learning rates")."""
    return lambda cfg: derived(cfg) if getattr(cfg, name) is None else getattr(cfg, name)


def _zo_bench(cls_name: str, lr: Callable, options: Optional[Callable[[TrainConfig], dict]] = None,
              **kw) -> Callable:
    """make_optimizer of one of ZO-Bench's family (zo_kernels.optim): lr(cfg), options(cfg) from flags,
    fixed options kw."""
    def make(params, cfg: TrainConfig):
        optim = _import_optim()
        extra = {} if options is None else options(cfg)
        return getattr(optim, cls_name)(params, lr=lr(cfg), eps=cfg.eps, weight_decay=cfg.weight_decay, seed=cfg.seed,
                                        **kw, **extra, **_zo_extra(cfg))
    return make


def _queries_per_step(opt, cfg: TrainConfig, large: int) -> int:
    return opt.queries_per_step * cfg.batch_size


# ZO-Bench's family, LOZO and forward-grad.  Default lrs (each overridable by its flag) are MeZO's
# matched through each update rule: n-SPSA q·lr (1/q of the variance per step: the MeZO paper's
# n/(n + d − 1) effective rate); Sign and Adam lr·GRAD_SCALE (steps normalised by |c|); Cons lr;
# momentum (1 − β)·lr (its steady-state drift is lr/(1 − β)); LOZO / LOZO-M lr/r (Var(Z_ij) = r);
# forward-grad lr (c is ∇f·z itself).
register(Method("n-spsa", "n-SPSA", "zo",
                _zo_bench("MeZO", _lr("lr_n_spsa", lambda c: c.q * c.lr_mezo), lambda c: {"n_directions": c.q}),
                _queries_per_step, "tab:cyan"))
register(Method("zo-sgd-sign", "ZO-SGD-Sign", "zo",
                _zo_bench("ZOSGDSign", _lr("lr_zo_sgd_sign", lambda c: GRAD_SCALE * c.lr_mezo)), _queries_per_step,
                "tab:olive"))
register(Method("zo-sgd-cons", "ZO-SGD-Cons", "zo", _zo_bench("ZOSGDCons", _lr("lr_zo_sgd_cons", lambda c: c.lr_mezo)),
                _queries_per_step, "tab:brown"))
_mmt_lr = _lr("lr_zo_sgd_mmt", lambda c: (1 - MMT_BETA) * c.lr_mezo)
register(Method("zo-sgd-mmt", "ZO-SGD-MMT (seeded)", "zo",
                _zo_bench("ZOSGDMomentum", _mmt_lr, momentum=MMT_BETA, state="seeded", window=32),
                _queries_per_step, "tab:pink"))
register(Method("zo-sgd-mmt-dense", "ZO-SGD-MMT (dense)", "zo",
                _zo_bench("ZOSGDMomentum", _mmt_lr, momentum=MMT_BETA, state="dense"), _queries_per_step, "tab:gray"))
register(Method("zo-adam", "ZO-Adam", "zo", _zo_bench("ZOAdam", _lr("lr_zo_adam", lambda c: GRAD_SCALE * c.lr_mezo)),
                _queries_per_step, "tab:orange"))
# LOZO / LOZO-M (low-rank perturbations U Vᵀ, rank --lozo-rank, V kept --lozo-nu steps)
_lozo_lr = _lr("lr_lozo", lambda c: c.lr_mezo / c.lozo_rank)


def _lozo_options(cfg: TrainConfig) -> dict:
    return {"rank": cfg.lozo_rank, "nu": cfg.lozo_nu}


register(Method("lozo", "LOZO", "zo", _zo_bench("LOZO", _lozo_lr, _lozo_options),
                lambda opt, cfg, large: 2 * cfg.batch_size, "teal"))
register(Method("lozo-m", "LOZO-M", "zo", _zo_bench("LOZOM", _lozo_lr, _lozo_options, beta=MMT_BETA),
                lambda opt, cfg, large: 2 * cfg.batch_size, "darkgoldenrod"))


def _make_forward_grad(params, cfg: TrainConfig, module: torch.nn.Module):
    """ForwardGrad trains the module's parameters that require grad: they must be `params`."""
    optim = _import_optim()
    opt = optim.ForwardGrad(module, lr=_lr("lr_forward_grad", lambda c: c.lr_mezo)(cfg),
                            weight_decay=cfg.weight_decay, seed=cfg.seed, **_zo_extra(cfg))
    mine = {id(p) for g in opt.param_groups for p in g["params"]}
    if mine != {id(p) for p in params}:
        raise FinetuneError("forward-grad trains the model's parameters with requires_grad=True, which differ "
                            "from the trainable parameters chosen")
    return opt


# Forward gradient (exact ∇f·z by a jvp, charged fg_query_cost queries per example: module docstring).
register(Method("forward-grad", "Forward-Grad", "zo", _make_forward_grad,
                lambda opt, cfg, large: cfg.fg_query_cost * cfg.batch_size, "black",
                needs_module=True, differentiates=True, query_cost=lambda cfg: cfg.fg_query_cost))


class _Labels(dict):
    """LABELS[m] for any registered method (also those registered after import)."""

    def __missing__(self, key):
        return METHODS[key].label if key in METHODS else key

    def __contains__(self, key):
        return key in METHODS

    def get(self, key, default=None):
        return METHODS[key].label if key in METHODS else default


LABELS = _Labels()


def is_zo(method: str) -> bool:
    return METHODS[method].kind == "zo"


def make_annealer(opt, steps_per_epoch: int, cfg: TrainConfig):
    optim = _import_optim()
    if not hasattr(optim, "LossRatioAnnealing"):
        raise FinetuneError("--anneal: zo_kernels.optim has no LossRatioAnnealing")
    return optim.LossRatioAnnealing(opt, steps_per_epoch=steps_per_epoch, kappa=cfg.kappa, alpha=cfg.alpha)


def _as_float(loss) -> float:
    if isinstance(loss, torch.Tensor):
        return float(loss.detach().float().cpu())
    return float(loss)


@dataclass
class RunResult:
    method: str
    lr: float = float("nan")         # the optimizer's (first group's) learning rate at the start
    steps: int = 0
    queries: int = 0
    train_s: float = 0.0
    eval_s: float = 0.0
    forward_s: float = 0.0
    other_s: float = 0.0             # ZO: noise ops; FO: backward + optimizer update
    backward_s: float = 0.0
    update_s: float = 0.0
    full_steps: int = 0
    step_losses: List[list] = field(default_factory=list)    # [queries, step loss, full step]
    curve: List[dict] = field(default_factory=list)          # eval points
    final: dict = field(default_factory=dict)
    lr_history: List[list] = field(default_factory=list)    # [step, lr] (--anneal) or [step, factor] (--lr-schedule)
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


def eval_train_index(train, cfg: TrainConfig) -> range:
    """The training examples whose mean loss the eval points report: the first `eval_train` of the
    (randomly ordered) training split, or all of it."""
    n = len(train)
    return range(n if cfg.eval_train <= 0 else min(cfg.eval_train, n))


def _eval_point(net, data_enc, cfg, res: RunResult, step: int, queries: int, t_train: float, opt=None):
    _settle(opt)
    t0 = time.perf_counter()
    te = evaluate(net, data_enc["test"], cfg.micro_batch)
    tr = float(mean_loss(net, data_enc["train"], eval_train_index(data_enc["train"], cfg), cfg.micro_batch))
    res.eval_s += time.perf_counter() - t0
    res.curve.append({"step": step, "queries": queries, "train_loss": tr, "test_acc": te["acc"],
                      "test_loss": te["loss"], "train_s": t_train})
    return tr, te


class MethodRun:
    """One method's training run as a resumable state machine: `run()` steps until the budget is
    spent; `state_dict()` / `load_state_dict()` capture everything the rest of the run depends on
    (weights, optimizer state, data order, RNG states, counters, the eval history)."""

    def __init__(self, method: str, net, trainable, data_enc, cfg: TrainConfig, start_point: dict,
                 progress: bool = True):
        self.method, self.spec = method, METHODS[method]
        self.net, self.trainable, self.data, self.cfg, self.progress = net, trainable, data_enc, cfg, progress
        train = data_enc["train"]
        self.res = RunResult(method)
        self.res.curve.append(dict(start_point))
        self.opt = self.spec.build(net, trainable, cfg)
        self.res.lr = float(self.opt.param_groups[0]["lr"])
        self.meter = Meter(cfg.device)
        self.step, self.t_train = 0, 0.0
        if self.spec.kind == "zo":
            self.batch = cfg.batch_size
            self.total = cfg.queries
            self.large = min(cfg.large_batch, len(train))
            steps_per_epoch = max(1, len(train) // cfg.batch_size)
            self.annealer = make_annealer(self.opt, steps_per_epoch, cfg) if cfg.anneal else None
        else:
            self.batch = min(cfg.fo_batch_size or cfg.batch_size, len(train))
            self.n_steps = max(1, int(round(cfg.fo_epochs * len(train) / self.batch)))
            self.total = self.n_steps * self.batch
            self.annealer = None
        self.sampler = Sampler(len(train), self.batch, cfg.seed)
        self.sched = EvalSchedule(self.total, cfg.evals)
        self.lr_sched = LRSchedule(self.opt, cfg.lr_schedule, self.total) if cfg.lr_schedule != "constant" else None
        self.done = False

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        # The optimizer first: MeZO settles a pending lookahead perturbation there, so the weights
        # saved next are θ_t (the same settle happens in the uninterrupted run with this cadence).
        opt_sd = self.opt.state_dict()
        return {"method": self.method, "weights": {k: v.detach().clone() for k, v in self.net.state_dict().items()},
                "optimizer": opt_sd, "sampler": self.sampler.state_dict(),
                "annealer": self.annealer.state_dict() if self.annealer is not None else None,
                "meter": asdict(self.meter), "step": self.step, "t_train": self.t_train,
                "sched_i": self.sched.i, "res": asdict(self.res), "done": self.done,
                "torch_rng": torch.get_rng_state()}

    def load_state_dict(self, sd: dict) -> None:
        if sd["method"] != self.method:
            raise FinetuneError(f"checkpoint is for method {sd['method']}, not {self.method}")
        with torch.no_grad():
            self.net.load_state_dict(sd["weights"])
        self.opt.load_state_dict(sd["optimizer"])
        self.sampler.load_state_dict(sd["sampler"])
        if self.annealer is not None and sd.get("annealer") is not None:
            self.annealer.load_state_dict(sd["annealer"])
        self.meter = Meter(**sd["meter"])
        self.step, self.t_train, self.sched.i, self.done = int(sd["step"]), float(sd["t_train"]), \
            int(sd["sched_i"]), bool(sd["done"])
        self.res = RunResult(**sd["res"])
        torch.set_rng_state(sd["torch_rng"])

    # ------------------------------------------------------------------- loop
    def run(self, checkpoint: Optional[Callable[["MethodRun"], None]] = None, every: int = 0) -> RunResult:
        """Train to the end of the budget; call `checkpoint(self)` every `every` steps (0: never)."""
        from tqdm.auto import tqdm

        bar = tqdm(total=self.total, initial=self.meter.queries, desc=self.spec.label, unit="q",
                   disable=not self.progress, dynamic_ncols=True, leave=True, mininterval=1.0)
        one = self._zo_step if self.spec.kind == "zo" else self._fo_step
        while not self.done:
            q0 = self.meter.queries
            loss = one()
            if loss is None:          # the budget is spent
                self.done = True
                break
            bar.update(self.meter.queries - q0)
            bar.set_postfix_str(f"loss={loss:.4f} step={self.step}", refresh=False)
            if not math.isfinite(loss):
                self.res.diverged = True
                self.done = True
                break
            if self.sched.due(self.meter.queries):
                bar.clear()
                tr, te = _eval_point(self.net, self.data, self.cfg, self.res, self.step, self.meter.queries,
                                     self.t_train, self.opt)
                bar.set_postfix_str(f"loss={loss:.4f} step={self.step} train={tr:.4f} test_acc={te['acc']:.3f}")
            if checkpoint is not None and every and self.step % every == 0:
                checkpoint(self)
        bar.close()
        return self.finish()

    def _schedule_lr(self) -> None:
        """--lr-schedule: set the coming step's rates from the queries spent so far, and log the factor."""
        if self.lr_sched is not None:
            self.res.lr_history.append([self.step + 1, self.lr_sched.apply(self.meter.queries)])

    def _zo_step(self) -> Optional[float]:
        cfg, net, meter, train = self.cfg, self.net, self.meter, self.data["train"]
        full = _is_full_step(self.opt) and hasattr(self.opt, "is_full_step")
        if meter.queries + self.spec.step_cost(self.opt, cfg, self.large) > self.total:
            return None
        self._schedule_lr()
        idx = self.sampler.next()
        # Data parallel: this rank's share of the step's batch; queries count the whole batch.
        mine = zdist.shard_list(idx) if cfg.distributed else idx
        batch = train.batch(mine)
        objective = self.spec.objective(cfg)
        closure = TimedClosure(lambda: (batch_objective(net, batch, objective), len(mine)),
                               len(idx) * self.spec.queries_per_example(cfg), meter)
        f0 = meter.forward_s
        _sync(cfg.device)
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                if full:
                    lidx = self.sampler.large(self.large)
                    lmine = zdist.shard_list(lidx) if cfg.distributed else lidx
                    full_closure = TimedClosure(
                        lambda: (mean_loss(net, train, lmine, cfg.micro_batch, objective).to(cfg.device),
                                 len(lmine)), len(lidx), meter)
                    loss = self.opt.step(closure, full_closure=full_closure)
                elif hasattr(self.opt, "is_full_step"):
                    loss = self.opt.step(closure, full_closure=None)
                else:
                    loss = self.opt.step(closure)
        except FloatingPointError:  # zo_kernels.optim.NonFiniteLossError: θ restored, the run has diverged
            loss = float("nan")
        _sync(cfg.device)
        dt = time.perf_counter() - t0
        self.t_train += dt
        self.res.other_s += dt - (meter.forward_s - f0)
        loss = _as_float(loss)
        self.step += 1
        self.res.full_steps += int(full)
        self.res.step_losses.append([meter.queries, loss, int(full)])
        if self.annealer is not None:
            self.annealer.step(loss)
            self.res.lr_history.append([self.step, float(self.opt.param_groups[0]["lr"])])
        return loss

    def _fo_step(self) -> Optional[float]:
        cfg, net, opt = self.cfg, self.net, self.opt
        if self.step >= self.n_steps:
            return None
        self._schedule_lr()
        batch = self.data["train"].batch(self.sampler.next())
        _sync(cfg.device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = batch_loss(net, batch)[1]        # FO needs a differentiable loss: cross-entropy always
        _sync(cfg.device)
        t1 = time.perf_counter()
        loss.backward()
        _sync(cfg.device)
        t2 = time.perf_counter()
        opt.step()
        _sync(cfg.device)
        t3 = time.perf_counter()
        self.res.forward_s += t1 - t0
        self.res.backward_s += t2 - t1
        self.res.update_s += t3 - t2
        self.t_train += t3 - t0
        self.meter.queries += self.batch
        self.step += 1
        lv = float(loss.detach())
        self.res.step_losses.append([self.meter.queries, lv, 0])
        return lv

    def finish(self) -> RunResult:
        res, cfg = self.res, self.cfg
        _settle(self.opt)
        if self.spec.kind == "fo":
            self.opt.zero_grad(set_to_none=True)
        if not res.curve or res.curve[-1]["queries"] != self.meter.queries or len(res.curve) == 1:
            _eval_point(self.net, self.data, cfg, res, self.step, self.meter.queries, self.t_train, self.opt)
        res.steps, res.queries, res.train_s = self.step, self.meter.queries, self.t_train
        if self.spec.kind == "zo":
            res.forward_s = self.meter.forward_s
        else:
            res.other_s = res.backward_s + res.update_s
        t0 = time.perf_counter()
        val = evaluate(self.net, self.data["val"], cfg.micro_batch)
        res.eval_s += time.perf_counter() - t0
        last = res.curve[-1]
        res.final = {"train_loss": last["train_loss"], "test_acc": last["test_acc"], "test_loss": last["test_loss"],
                     "val_acc": val["acc"], "val_loss": val["loss"]}
        return res


def run_method(method: str, net, trainable, data_enc, cfg: TrainConfig, start_point: dict,
               progress: bool = True) -> RunResult:
    if method not in METHODS:
        raise FinetuneError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    return MethodRun(method, net, trainable, data_enc, cfg, start_point, progress).run()
