"""The training loop: one method's run as a resumable state machine (`MethodRun`), with its
query meter, data sampler and timing.

Cost is counted in queries: one query = one forward pass of one example.  Every call of a
loss closure on n examples adds n queries (counted, not assumed), so a MeZO step costs
2·batch, a MeZO-SVRG minibatch step 4·batch and a full (large-batch) step 2·large_batch.
A method whose closure costs more per example says so (`Method.query_cost`: forward-grad's jvp,
zo_kernels.finetune.methods).  Time is split by wrapping the closures with a timer: forward =
time inside closure calls, noise = the rest of opt.step (perturb, restore, update, anchor swaps).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, List, Optional

import numpy as np
import torch

from .. import distributed as zdist
from .config import TrainConfig
from .errors import FinetuneError
from .evaluation import batch_loss, batch_objective, eval_train_index, evaluate, mean_loss
from .registry import METHODS, import_optim, is_full_step
from .schedules import EvalSchedule, LRSchedule


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



def make_annealer(opt, steps_per_epoch: int, cfg: TrainConfig):
    optim = import_optim()
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



def _settle(opt) -> None:
    """MeZO with lookahead leaves the weights at θ+μz between steps: bring them to θ before evaluating."""
    if opt is not None and hasattr(opt, "settle"):
        opt.settle()



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
        if cfg.clip_dd is not None:
            self.opt.set_dd_clip(cfg.clip_dd)
        self.res.lr = float(self.opt.param_groups[0]["lr"])
        self.meter = Meter(cfg.device)
        self.step, self.t_train = 0, 0.0
        if self.spec.kind == "zo":
            self.batch = cfg.batch_size
            self.total = cfg.queries
            self.large = min(cfg.option("large_batch"), len(train))
            first = self.spec.step_cost(self.opt, cfg, self.large)
            if first > self.total:      # it would end after 0 steps, as if it had run
                raise FinetuneError(f"the ZO budget of {self.total:,} queries is below one {self.spec.label} step "
                                    f"({first:,} queries); raise --queries or --steps")
            steps_per_epoch = max(1, len(train) // cfg.batch_size)
            self.annealer = make_annealer(self.opt, steps_per_epoch, cfg) if cfg.anneal else None
        else:
            self.batch = min(cfg.option("fo_batch_size") or cfg.batch_size, len(train))
            self.n_steps = max(1, int(round(cfg.option("fo_epochs") * len(train) / self.batch)))
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
        full = is_full_step(self.opt) and hasattr(self.opt, "is_full_step")
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


