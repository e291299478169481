"""Hugging Face glue: `ZOTrainer`, a `transformers.Trainer` that trains with any registered ZO method
(MeZO, MeZO-SVRG, ZO-Bench's family, LOZO, ...: zo_kernels.finetune.registry).

    from zo_kernels.integrations.hf import ZOTrainer, ZOArguments
    trainer = ZOTrainer(model=model, args=training_args, train_dataset=train, eval_dataset=val,
                        zo_args=ZOArguments(optimizer="mezo-svrg", lr_full=1e-5, q=2))   # was: Trainer(...)
    trainer.train()

`ZOArguments` is built from the registry: `optimizer` is a method's `zo-finetune --methods` name, and
each knob of the registered methods is a field under its name (`q`, `anchor`, `lozo_rank`, ...; MeZO-SVRG's
full-step rate is `lr_full`), None meaning the knob's Trainer default (MeZO-SVRG: q = 2, lr_full = 10 ×
learning_rate; MeZO: no lookahead) or else its registry default.  A knob of another method is refused.

How it fits the Trainer loop (transformers 5.x `_run_epoch`): `training_step` runs the whole ZO
step (forward passes only, under no_grad) and returns the loss detached; the loop then clips
(nothing: there are no gradients), calls `optimizer.step()` -- which the ZO optimizer treats as
already done (one closure-free call is allowed per training_step) -- steps the LR scheduler
(it scales `lr`, i.e. η2 for MeZO-SVRG; `lr_full` is not scheduled) and zeroes (absent) grads.

- Learning rate: `args.learning_rate` is η (MeZO) or η2 (MeZO-SVRG); weight decay follows the
  Trainer's decay / no-decay parameter groups.  Use lr_scheduler_type="constant" for the papers'
  settings (the Trainer's default is linear decay).
- MeZO-SVRG full steps (every q steps) evaluate a large batch of `full_batch_size` examples drawn
  from the train set (all of it when None), in micro-batches of `full_micro_batch_size`; the
  Trainer's own batch of that step is not used.  The draw of step t is seeded by (args.seed, t),
  so resuming from a checkpoint draws the same batches as an uninterrupted run.
- Step hooks (`register_step_pre_hook` / `register_step_post_hook`) fire once per training step,
  around the ZO step; the Trainer's closure-free `optimizer.step()` that follows fires none.
- Dropout: the ZO forward passes run with model.eval() (as MeZO does) unless train_mode=True;
  two-point estimates with different dropout masks are mostly noise.
- gradient_accumulation_steps = n > 1: the n micro-batches of one optimizer step are one ZO step.
  `training_step` keeps the first n − 1 micro-batches (their inputs only; it returns 0 for them) and
  on the last one runs the ZO step with a closure that evaluates every micro-batch at the same
  perturbed weights and returns the mean of their losses (2q·n forward passes of one micro-batch
  each, activations of one micro-batch at a time), so the Trainer's logged loss is that mean.
- Lookahead MeZO: the weights are settled before evaluation (Trainer calls optimizer.eval()),
  before saving (save_model / checkpoints) and at the end of train().
- Models load from a local directory like any HF model (`from_pretrained(path)`, HF_HUB_OFFLINE=1).
"""
from __future__ import annotations

from dataclasses import field, make_dataclass
from typing import Any, Dict, Optional

import torch

try:
    from transformers import Trainer
except ImportError as e:  # pragma: no cover - transformers is a dependency of this module only
    raise ImportError("zo_kernels.integrations.hf needs `transformers`") from e

from ..finetune.config import TrainConfig
from ..finetune.registry import KNOBS, METHODS, is_full_step
from ..optim import MeZO
from ..optim.base import ZOOptimizer


def trainer_methods() -> list:
    """The registered methods a Trainer can run: ZO ones whose optimizer takes parameters (not the module)."""
    return [m for m, e in METHODS.items() if e.kind == "zo" and not e.needs_module]


OPTIMIZERS = tuple(trainer_methods())
# Every knob of those methods but their learning rates (the Trainer's `learning_rate` is that), as a
# ZOArguments field under its Trainer name; None = the knob's Trainer default, else its registry default.
_LR_KNOBS = {METHODS[m].lr_knob for m in OPTIMIZERS}
_TRAINER_KNOBS = [k for k in KNOBS.values() if k.field and k.name not in _LR_KNOBS
                  and any(k in METHODS[m].knobs for m in OPTIMIZERS)]


def _check(self) -> None:
    methods = trainer_methods()
    if self.optimizer not in methods:
        raise ValueError(f"ZOArguments.optimizer must be one of {tuple(methods)}, got {self.optimizer!r}")
    mine = {k.name for k in METHODS[self.optimizer].knobs}
    for k in _TRAINER_KNOBS:
        if getattr(self, k.field) is not None and k.name not in mine:
            raise ValueError(f"{k.field} is not an option of {self.optimizer} (it is one of "
                             f"{', '.join(m for m in methods if k in METHODS[m].knobs)})")
    for name in self.options or {}:
        if name not in mine:
            raise ValueError(f"options: {name!r} is not a knob of {self.optimizer}")


ZOArguments = make_dataclass("ZOArguments", [
    ("optimizer", str, field(default="mezo")),            # a registered ZO method's name
    ("eps", float, field(default=1e-3)),                  # μ
    ("full_batch_size", Optional[int], field(default=None)),   # MeZO-SVRG: examples per full step (None: all)
    ("full_micro_batch_size", Optional[int], field(default=None)),  # default: per_device_train_batch_size
    ("seed", Optional[int], field(default=None)),         # noise base seed (default: args.seed)
    ("nan_policy", str, field(default="raise")),
    ("train_mode", bool, field(default=False)),           # run ZO forwards in train mode (dropout on)
    ("record", bool, field(default=False)),
    ("rounding", str, field(default="nearest")),
    ("backend", Optional[str], field(default=None)),
    ("options", Optional[Dict[str, Any]], field(default=None)),  # knobs of methods registered after this import
    *[(k.field, Any, field(default=None)) for k in _TRAINER_KNOBS],
], namespace={"__post_init__": _check, "__doc__": "The ZOTrainer's settings: the method (`optimizer`), the run-wide "
              "ZO options, and one field per knob of the registered methods (zo_kernels.finetune.registry), "
              "None meaning that knob's default."})
ZOArguments.__module__ = __name__


def _config(z, learning_rate: float, seed: int) -> TrainConfig:
    """The TrainConfig of the Trainer's method: its lr from `learning_rate`, each knob as given, else its
    Trainer default, else (through TrainConfig.option) its registry default."""
    m = METHODS[z.optimizer]
    cfg = TrainConfig(eps=z.eps, seed=seed, backend=z.backend, rounding=z.rounding, record=z.record,
                      nan_policy=z.nan_policy, options={m.lr_knob: learning_rate, **(z.options or {})})
    for k in m.knobs:
        v = getattr(z, k.field, None) if k.field else None
        if v is not None:
            cfg.options[k.name] = v
    for k in m.knobs:
        if cfg.options.get(k.name) is None and k.trainer_default is not None:
            d = k.trainer_default
            cfg.options[k.name] = d(cfg) if callable(d) else d
    return cfg


class ZOTrainer(Trainer):
    """`transformers.Trainer` with a zeroth-order optimizer (MeZO / MeZO-SVRG); see the module doc."""

    def __init__(self, *args, zo_args: Optional[ZOArguments] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.zo_args = zo_args if zo_args is not None else ZOArguments()
        self._micro_batches: list = []   # gradient accumulation: inputs of this ZO step so far
        self.zo_optimizer: Optional[ZOOptimizer] = None
        self._watch_handle = None

    # ------------------------------------------------------------ optimizer
    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            inner = getattr(self.optimizer, "optimizer", self.optimizer)
            if not isinstance(inner, ZOOptimizer):
                raise TypeError(f"ZOTrainer needs a zo_kernels.optim optimizer, got {type(inner).__name__}")
            self.zo_optimizer = inner
            return self.optimizer
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        named = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad]
        groups = [{"params": [p for n, p in named if n in decay], "weight_decay": self.args.weight_decay},
                  {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        z = self.zo_args
        seed = self.args.seed if z.seed is None else z.seed
        opt = METHODS[z.optimizer].build(opt_model, groups, _config(z, self.args.learning_rate, seed))
        self.optimizer = opt
        self.zo_optimizer = opt
        if isinstance(opt, MeZO) and opt.lookahead and self._watch_handle is None:
            self._watch_handle = opt.watch(self.model, action="settle")
        return opt

    # --------------------------------------------------------------- losses
    def _zo_loss(self, model, inputs) -> torch.Tensor:
        with self.compute_loss_context_manager():
            # compute_loss may pop "labels": give it its own dict each time.
            loss = self.compute_loss(model, dict(inputs))
        if self.args.n_gpu > 1:
            loss = loss.mean()
        return loss.detach()

    def _full_batches(self):
        z = self.zo_args
        ds = self.train_dataset
        try:
            import datasets
            if isinstance(ds, datasets.Dataset):
                ds = self._remove_unused_columns(ds, description="training")
        except ImportError:
            pass
        n = len(ds)
        size = n if z.full_batch_size is None else min(int(z.full_batch_size), n)
        if size == n:
            idx = list(range(n))
        else:
            # Seeded by the optimizer's step count, which its state_dict carries: a resumed run draws
            # the same large batches as an uninterrupted one (and a retried full step the same one).
            t = self.zo_optimizer.step_count
            g = torch.Generator().manual_seed((self.args.seed * 1_000_003 + t) % (2 ** 63))
            idx = torch.randperm(n, generator=g)[:size].tolist()
        micro = z.full_micro_batch_size or self.args.per_device_train_batch_size
        batches = []
        for s in range(0, len(idx), micro):
            chunk = idx[s:s + micro]
            batch = self.data_collator([ds[i] for i in chunk])
            batches.append((len(chunk), self._prepare_inputs(batch)))
        return batches

    def _full_closure(self, model):
        batches = self._full_batches()
        total = sum(n for n, _ in batches)

        def full_closure():
            acc = None
            for n, inputs in batches:
                part = self._zo_loss(model, inputs).double() * (n / total)
                acc = part if acc is None else acc + part
            return acc

        return full_closure

    def _mean_loss(self, model, micro: list) -> torch.Tensor:
        """The closure of one ZO step: the mean loss of its micro-batches, at the same weights."""
        if len(micro) == 1:
            return self._zo_loss(model, micro[0])
        return sum(self._zo_loss(model, inputs).double() for inputs in micro) / len(micro)

    # ------------------------------------------------------------ the step
    def training_step(self, model, inputs: Dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        opt = self.zo_optimizer
        if opt is None:
            raise RuntimeError("ZOTrainer.training_step before create_optimizer")
        model.train(self.zo_args.train_mode)
        self._micro_batches.append(self._prepare_inputs(inputs))
        if self.args.gradient_accumulation_steps > 1 and not self.accelerator.sync_gradients:
            return torch.tensor(0.0, device=self.args.device)   # the ZO step runs on the window's last batch
        micro, self._micro_batches = self._micro_batches, []
        if is_full_step(opt):
            loss = opt.step(None, full_closure=self._full_closure(model))
        else:
            loss = opt.step(lambda: self._mean_loss(model, micro))
        opt.skip_next_empty_step()      # the Trainer's optimizer.step() that follows is this step
        return torch.tensor(float(loss), device=self.args.device)

    # --------------------------------------------------- settle before use
    def _settle(self):
        if self.zo_optimizer is not None:
            self.zo_optimizer.settle()

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        self._settle()
        super().save_model(output_dir, _internal_call=_internal_call)

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:
            self._settle()
