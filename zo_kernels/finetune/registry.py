"""The method registry: what `zo-finetune --methods` and `ZOTrainer(zo_args=ZOArguments(optimizer=...))`
can run, and every method's knobs, each declared once.

A `Method` names its optimizer factory, its cost in queries and its `Knob`s.  A knob is one
setting of one or more methods (a learning rate, LOZO's rank, MeZO-SVRG's q): its name is the
`zo-finetune` flag (`--lr-lozo`), the `TrainConfig.options` key and the `ZOArguments` field
(unless `trainer_name` says otherwise); its default, the rule that derives it from other knobs
when it is not given, its checks and its help text live here and nowhere else.  The parser,
`TrainConfig` and `ZOArguments` are built from `KNOBS`.

Adding a method (the whole recipe; docs/optimizers.md shows a real one):

    from zo_kernels.finetune.registry import Knob, Method, register

    LR_MINE = Knob("lr_mine", None, "my method's lr", derive=lambda c: c.option("lr_mezo"),
                   rule="--lr-mezo", rate=True)
    register(Method("mine", "Mine", "zo", lambda params, cfg: Mine(params, lr=cfg.option("lr_mine"),
                    eps=cfg.eps, seed=cfg.seed, **zo_extra(cfg)),
                    step_cost=lambda opt, cfg, large: 2 * cfg.batch_size, knobs=(LR_MINE,), lr_knob="lr_mine"))

before `zo-finetune`'s `main` parses its arguments (`zo_kernels.finetune.cli.main`).

A ZO method's `make_optimizer(params, cfg)` returns an optimizer with `step(closure)` (closure:
forward only, returns (loss, n_local)); `step_cost(opt, cfg, large)` is the queries its next
step will spend (checked against the budget before the step).  An optimizer with an
`is_full_step` attribute/method gets a `full_closure` (the large-batch loss) on the steps where
it is true, as MeZO-SVRG does.  It should have `state_dict()/load_state_dict()` that resume
bit-identically (checkpoints).  A method whose optimizer runs the model itself (forward-grad:
torch.func.jvp through the module) sets `needs_module` and gets `make_optimizer(params, cfg,
module=net)`; one that differentiates its objective sets `differentiates` and is given
cross-entropy whatever --objective says (as the FO baselines are).  An FO method gives a
torch.optim.Optimizer; the loop does forward + backward + step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Tuple

from .errors import FinetuneError

if TYPE_CHECKING:  # config imports this module
    from .config import TrainConfig

KINDS = ("zo", "fo")


@dataclass(frozen=True)
class Knob:
    """One setting of one or more methods, declared once (see the module docstring)."""
    name: str                        # flag --name-with-dashes, TrainConfig.options key, ZOArguments field
    default: Any                     # None with `derive`: derived when not given
    help: str
    type: Callable = float           # the flag's type; bool: --name / --no-name
    choices: Optional[tuple] = None
    derive: Optional[Callable[["TrainConfig"], Any]] = None   # the value when not given
    rule: str = ""                   # `derive` in words, for the help text
    minimum: Optional[float] = None  # refused below it (at or below it with `strict`)
    strict: bool = False
    maximum: Optional[float] = None  # refused above it
    rate: bool = False               # a ZO learning rate: the update scales θ by 1 - rate * weight_decay
    metavar: Optional[str] = None
    trainer_name: Optional[str] = None     # its ZOArguments field when that differs; "" = not in ZOArguments
    trainer_default: Any = None            # value (or callable(cfg)) when the Trainer is not given it

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def field(self) -> str:
        """Its ZOArguments field ("" when the Trainer does not take it)."""
        return self.name if self.trainer_name is None else self.trainer_name

    def help_text(self) -> str:
        return f"{self.help}; not given: {self.rule}" if self.derive is not None else self.help

    def problem(self, value, weight_decay: float = 0.0) -> Optional[str]:
        """Why `value` is refused (None: accepted)."""
        if value is None:
            return None
        if self.choices is not None and value not in self.choices:
            return f"{self.flag} must be one of {', '.join(map(str, self.choices))}, got {value!r}"
        if isinstance(value, float) and not math.isfinite(value):
            return f"{self.flag} must be a finite number, got {value}"
        if self.minimum is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
            if value < self.minimum or (self.strict and value == self.minimum):
                return f"{self.flag} must be {'>' if self.strict else '>='} {self.minimum:g}, got {value}"
        if self.maximum is not None and isinstance(value, (int, float)) and value > self.maximum:
            return f"{self.flag} must be <= {self.maximum:g}, got {value}"
        if self.rate and value * weight_decay >= 1:
            return (f"{self.flag} {value} times --weight-decay {weight_decay} must be < 1 (the ZO update "
                    f"scales θ by 1 - lr*weight_decay)")
        return None


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
    knobs: Tuple[Knob, ...] = ()     # the settings it reads through cfg.option(name)
    lr_knob: Optional[str] = None    # the knob that is its learning rate (the Trainer sets it from its own)

    def build(self, net, params, cfg: "TrainConfig"):
        """This method's optimizer over `params` (the trainable parameters of `net`)."""
        if self.needs_module:
            return self.make_optimizer(params, cfg, module=net)
        return self.make_optimizer(params, cfg)

    def queries_per_example(self, cfg: "TrainConfig") -> int:
        return 1 if self.query_cost is None else int(self.query_cost(cfg))

    def objective(self, cfg: "TrainConfig") -> str:
        return "loss" if self.differentiates else cfg.objective


METHODS: Dict[str, Method] = {}
KNOBS: Dict[str, Knob] = {}          # every registered method's knobs, in registration order


def register(m: Method) -> Method:
    if m.kind not in KINDS:
        raise ValueError(f"method {m.name}: kind must be 'zo' or 'fo', got {m.kind!r}")
    if m.kind == "zo" and m.step_cost is None:
        raise ValueError(f"method {m.name}: a ZO method needs step_cost")
    names = {k.name for k in m.knobs}
    if m.lr_knob is not None and m.lr_knob not in names:
        raise ValueError(f"method {m.name}: lr_knob {m.lr_knob!r} is not one of its knobs")
    for k in m.knobs:
        if k.name in KNOBS and KNOBS[k.name] != k:
            raise ValueError(f"method {m.name}: a different knob named {k.name!r} is already registered")
    for k in m.knobs:
        KNOBS.setdefault(k.name, k)
    METHODS[m.name] = m
    return m


def knob_users(name: str) -> list:
    """The methods that read knob `name`."""
    return [m.name for m in METHODS.values() if any(k.name == name for k in m.knobs)]


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


def zo_extra(cfg: "TrainConfig") -> dict:
    """The options every ZO optimizer takes from the run rather than from a knob (passed only when
    they differ from the optimizers' defaults)."""
    extra = {"distributed": True} if cfg.distributed else {}
    if cfg.backend:
        extra["backend"] = cfg.backend
    if cfg.rounding != "nearest":
        extra["rounding"] = cfg.rounding
    if cfg.record:
        extra["record"] = True
    if cfg.nan_policy != "raise":
        extra["nan_policy"] = cfg.nan_policy
    return extra


def import_optim():
    """zo_kernels.optim, or one clear error when it does not import."""
    try:
        from .. import optim
    except Exception as e:
        raise FinetuneError(f"zo_kernels.optim does not import ({type(e).__name__}: {e})") from None
    return optim


def is_full_step(opt) -> bool:
    v = getattr(opt, "is_full_step", False)
    return bool(v() if callable(v) else v)


# The built-in entries: registered whenever the registry is imported, so METHODS never lacks them.
from . import methods as _builtin  # noqa: E402,F401
