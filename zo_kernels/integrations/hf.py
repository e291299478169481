"""Hugging Face glue: `ZOTrainer`, a `transformers.Trainer` that trains with MeZO or MeZO-SVRG.

    from zo_kernels.integrations.hf import ZOTrainer, ZOArguments
    trainer = ZOTrainer(model=model, args=training_args, train_dataset=train, eval_dataset=val,
                        zo_args=ZOArguments(optimizer="mezo-svrg", lr_full=1e-5, q=2))   # was: Trainer(...)
    trainer.train()

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

from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch

try:
    from transformers import Trainer
except ImportError as e:  # pragma: no cover - transformers is a dependency of this module only
    raise ImportError("zo_kernels.integrations.hf needs `transformers`") from e

from ..optim import MeZO, MeZOSVRG, ZOAdam, ZOSGDCons, ZOSGDMomentum, ZOSGDSign
from ..optim.base import ZOOptimizer

OPTIMIZERS = ("mezo", "mezo-svrg", "zo-sgd-sign", "zo-sgd-cons", "zo-sgd-mmt", "zo-adam")


@dataclass
class ZOArguments:
    optimizer: str = "mezo"                    # "mezo" | "mezo-svrg"
    eps: float = 1e-3                          # μ
    lr_full: Optional[float] = None            # η1 for MeZO-SVRG (default: 10 × learning_rate)
    q: int = 2
    anchor: str = "dense"                      # "dense" | "replay"
    full_batch_size: Optional[int] = None      # examples per full step (None: the whole train set)
    full_micro_batch_size: Optional[int] = None  # default: per_device_train_batch_size
    lookahead: bool = False                    # MeZO only
    seed: Optional[int] = None                 # noise base seed (default: args.seed)
    nan_policy: str = "raise"
    train_mode: bool = False                   # run ZO forwards in train mode (dropout on)
    record: bool = False
    rounding: str = "nearest"
    backend: Optional[str] = None
    n_directions: int = 1                      # q of n-SPSA (every method but mezo-svrg and lookahead)
    momentum: float = 0.9                      # zo-sgd-mmt
    momentum_state: str = "seeded"             # zo-sgd-mmt: "seeded" | "dense"
    momentum_window: int = 32                  # zo-sgd-mmt seeded: K
    betas: tuple = (0.9, 0.999)                # zo-adam

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"ZOArguments.optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.lookahead and self.optimizer != "mezo":
            raise ValueError("lookahead is a MeZO option")


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
        common = dict(lr=self.args.learning_rate, eps=z.eps, seed=seed, record=z.record, rounding=z.rounding,
                      backend=z.backend, nan_policy=z.nan_policy)
        spsa = dict(common, n_directions=z.n_directions)
        if z.optimizer == "mezo":
            opt = MeZO(groups, lookahead=z.lookahead, **spsa)
        elif z.optimizer == "zo-sgd-sign":
            opt = ZOSGDSign(groups, **spsa)
        elif z.optimizer == "zo-sgd-cons":
            opt = ZOSGDCons(groups, **spsa)
        elif z.optimizer == "zo-sgd-mmt":
            opt = ZOSGDMomentum(groups, momentum=z.momentum, state=z.momentum_state, window=z.momentum_window,
                                **spsa)
        elif z.optimizer == "zo-adam":
            opt = ZOAdam(groups, betas=z.betas, **spsa)
        else:
            lr_full = z.lr_full if z.lr_full is not None else 10.0 * self.args.learning_rate
            opt = MeZOSVRG(groups, lr_full=lr_full, q=z.q, anchor=z.anchor, **common)
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
        if isinstance(opt, MeZOSVRG) and opt.is_full_step:
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
