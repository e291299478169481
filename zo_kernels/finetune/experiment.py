"""One `zo-finetune` experiment: for each seed, prepare the data split and model, evaluate the start,
run every method from the same start (resumable through checkpoints), then measure memory and write
results.json, curves.png and the table.  The CLI (zo_kernels.finetune.cli) parses and checks the
arguments and hands them here."""
from __future__ import annotations

import dataclasses
import os
import platform
import time
from dataclasses import asdict
from typing import List, Optional

import torch

from .. import distributed as zdist
from ..machine import cpu_name
from ..seedlog import finetune as seedlog_ft
from ..seedlog import model as seedlog_model
from . import checkpoint as ck
from . import data as data_mod
from . import files, report
from . import memory as mem_mod
from . import quantize as quant_ft
from .adapters import apply_peft, trainable_parameters
from .config import TrainConfig, query_budget
from .errors import FinetuneError
from .evaluation import eval_train_index, evaluate, mean_loss
from .heads import default_descriptions
from .model import Encoded, load_model_and_tokenizer, model_summary, resolve_model, select_trainable
from .registry import LABELS, METHODS, is_zo
from .training import MethodRun


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def record(m: str, r) -> dict:
    """The per-method result entry of results.json."""
    steps = max(r.steps, 1)
    zo = is_zo(m)
    ts = {"forward": 1e3 * r.forward_s / steps, "total": 1e3 * r.train_s / steps}
    if zo:
        ts["noise"] = 1e3 * r.other_s / steps
    else:
        ts["backward_update"] = 1e3 * r.other_s / steps
        ts["backward"] = 1e3 * r.backward_s / steps
        ts["update"] = 1e3 * r.update_s / steps
    return {"label": LABELS[m], "kind": "zo" if zo else "fo", "lr": r.lr, "steps": r.steps,
            "full_steps": r.full_steps, "queries": r.queries, "train_loss": r.final["train_loss"],
            "val_acc": r.final["val_acc"], "test_acc": r.final["test_acc"], "val_loss": r.final["val_loss"],
            "test_loss": r.final["test_loss"],
            "best_test_acc": max(p["test_acc"] for p in r.curve[1:]) if len(r.curve) > 1 else r.final["test_acc"],
            "wall_s": r.train_s + r.eval_s, "train_s": r.train_s, "eval_s": r.eval_s,
            "forward_s": r.forward_s, "noise_or_backward_s": r.other_s,
            "noise_to_forward": (r.other_s / r.forward_s) if (zo and r.forward_s) else None,
            "time_per_step_ms": ts, "diverged": r.diverged, "curve": r.curve,
            "step_losses": r.step_losses, "lr_history": r.lr_history}


def check_backend(name: Optional[str], device: str, dtype: str) -> None:
    """--backend: known, available here and able to run `dtype` on `device`, before the model loads."""
    if name is None:
        return
    from .. import backends

    try:
        backends.resolve(torch.device(device), getattr(torch, dtype), name)
    except (ValueError, RuntimeError, TypeError) as e:
        raise FinetuneError(f"--backend {name}: {str(e).splitlines()[0]}") from None


def _backend_name():
    try:
        import zo_kernels

        return zo_kernels.last_backend()
    except Exception:
        return None


class Experiment:
    """The run of parsed, checked arguments `a` over `methods` and `seeds`; `state` is the checkpoint
    being resumed (None: a new run)."""

    def __init__(self, a, argv: List[str], state: Optional[dict], methods: List[str], seeds: List[int],
                 peft_spec, device: str):
        self.a, self.argv, self.methods, self.seeds, self.peft_spec = a, argv, methods, seeds, peft_spec
        self.t_start = time.perf_counter()
        # Under torchrun: data parallel over the ranks (a no-op otherwise); rank 0 reports.
        self.dist_on = zdist.init_from_env()
        if self.dist_on:
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
        self.device = device
        self.main_rank = zdist.is_main_process()
        self.threads = a.threads or usable_cores()
        torch.set_num_threads(self.threads)
        check_backend(a.backend, device, a.dtype)
        # The directory before any work: writable, this run's alone (a lock naming the PID), dead
        # processes' temporary files gone.  Nothing in it is written until the model is loaded and
        # the start evaluated: a run that fails before training leaves its files as they were.
        self.lock = files.open_run_dir(a.out) if self.main_rank else None
        try:
            self.checkpointing = a.checkpoint_every > 0 or state is not None
            if self.checkpointing and state is None:
                state = {"argv": argv, "runs": [], "current": None}
            self.state = state
            self.labels = [x.strip() for x in a.labels.split(",")] if a.labels else None
            self.model_path = resolve_model(a.model)
        except BaseException:
            self.release()
            raise
        self.unloggable: Optional[dict] = None    # --save-log: method -> why it cannot be logged
        self.queries = query_budget(a)

    # ------------------------------------------------------------ helpers
    def release(self) -> None:
        """Give the output directory back (the lock file goes)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def say(self, *x) -> None:
        if self.main_rank:
            print(*x, flush=True)

    def save_state(self) -> None:
        if self.main_rank:
            ck.save(self.a.out, self.state)

    def config(self, seed: int, **run) -> TrainConfig:
        return TrainConfig.from_args(self.a, **{"seed": seed, "queries": self.queries, "device": self.device,
                                                "distributed": self.dist_on, **run})

    def trainable(self, net):
        if self.a.train == "scales":
            return quant_ft.scale_trainable(net)
        if self.peft_spec is not None:
            return trainable_parameters(net)
        return select_trainable(net, self.a.partial, self.a.bitfit)

    def log_recipe(self, seed: int, info: dict) -> dict:
        """--save-log: the starting model as zo-replay rebuilds it (zo_kernels.seedlog.model)."""
        a = self.a
        if self.unloggable is None:
            cfg = self.config(seed)
            self.unloggable = {m: why for m in self.methods if (why := seedlog_ft.why_not_loggable(m, cfg))}
            for m, why in self.unloggable.items():
                self.say(f"--save-log: no log for {LABELS[m]} ({why})")
        return seedlog_model.recipe(model=a.model, name=os.path.basename(str(a.model or "all-MiniLM-L6-v2").rstrip("/")), num_labels=info["data"].num_labels,
                                    labels=info["data"].label_names, dtype=a.dtype, seed=seed, head=a.head,
                                    descriptions=info["descriptions"], temperature=a.temperature,
                                    partial=a.partial, bitfit=a.bitfit, peft_spec=self.peft_spec)

    # --------------------------------------------------------------- seed
    def prepare(self, seed: int) -> dict:
        """This seed's data split, model (with its head) and tokenised splits."""
        a = self.a
        data = data_mod.load_text_classification(a.dataset, n_train=a.n_train, n_val=a.n_val, n_test=a.n_test,
                                                  seed=seed, text_column=a.text_column,
                                                  label_column=a.label_column, labels=self.labels)
        descriptions = None
        if a.head == "description":
            descriptions = ([x.strip() for x in a.label_descriptions.split("|")] if a.label_descriptions
                            else default_descriptions(data.label_names))
        net, tok = load_model_and_tokenizer(self.model_path, data.num_labels, a.dtype, self.device, seed,
                                            head=a.head, descriptions=descriptions, temperature=a.temperature)
        base_name = type(net).__name__
        quantized = quant_ft.quantize_model(net, a.quantize, self.device)
        net = apply_peft(net, self.peft_spec) if self.peft_spec is not None else net
        trainable = self.trainable(net)
        max_length = a.max_length
        cfg_net = getattr(net, "config", None)
        for limit in (getattr(cfg_net, "max_position_embeddings", None), getattr(tok, "model_max_length", None)):
            if isinstance(limit, int) and 0 < limit < max_length:
                max_length = limit  # the model cannot take longer inputs
        a.max_length = max_length
        enc = {k: Encoded(tok, getattr(data, k).texts, getattr(data, k).labels, max_length, self.device)
               for k in ("train", "val", "test")}
        return {"data": data, "enc": enc, "descriptions": descriptions, "net": net,
                "summary": {**model_summary(net, trainable), "architecture": base_name,
                            "tuning": report.tuning_name(vars(a)), **quant_ft.summary(net, quantized, a.train)}}

    def _start(self, seed: int, net, enc, cfg: TrainConfig) -> dict:
        """The seed's entry of the checkpoint with the start point, evaluated once for every method
        (same weights, same head), or the one being resumed."""
        state = self.state
        if state is not None and state.get("current") and state["current"]["seed"] == seed:
            return state["current"]
        d = TrainConfig()
        t0 = time.perf_counter()
        te0 = evaluate(net, enc["test"], d.micro_batch)
        tr0 = float(mean_loss(net, enc["train"], eval_train_index(enc["train"], cfg), d.micro_batch))
        start = {"step": 0, "queries": 0, "train_loss": tr0, "test_acc": te0["acc"],
                 "test_loss": te0["loss"], "train_s": 0.0}
        cur = {"seed": seed, "start": start, "start_eval_s": time.perf_counter() - t0, "done": {}, "active": None}
        if self.checkpointing:
            state["current"] = cur
            self.save_state()
        return cur

    def _run_method(self, m: str, seed: int, net, enc, cfg: TrainConfig, cur: dict,
                    recipe: Optional[dict] = None) -> dict:
        a = self.a
        log = recipe is not None and m not in self.unloggable
        if log:
            cfg = dataclasses.replace(cfg, record=True)
        mr = MethodRun(m, net, self.trainable(net), enc, cfg, cur["start"], progress=not a.no_progress)
        recorder = seedlog_ft.start(mr.opt, net, mr.trainable, recipe) if log else None   # hashes θ_0
        if cur.get("active") is not None and cur["active"]["method"] == m:
            try:
                mr.load_state_dict(cur["active"])
            except (ValueError, TypeError, RuntimeError, KeyError) as e:   # checkpoint.check passed, the fit did not
                text = str(e).strip().splitlines()
                raise FinetuneError(f"--resume {a.out}: {ck.FILE} does not fit this run's {m} "
                                    f"({text[0] if text else type(e).__name__}); the file is unchanged") from None
            self.say(f"{LABELS[m]}: resumed at step {mr.step} ({mr.meter.queries:,} queries)")

        def checkpoint_fn(run_):
            cur["active"] = run_.state_dict()
            self.save_state()

        r = mr.run(checkpoint_fn if self.checkpointing else None, a.checkpoint_every)
        if a.save_weights and self.main_rank:
            wdir = os.path.join(a.out, "weights")
            files.check_writable(wdir, "--save-weights")
            # a quantized base: the trained tensors alone (quant_ft.load_trained puts them back on a fresh one)
            files.torch_save(os.path.join(wdir, f"seed{seed}_{m}.pt"), quant_ft.trained_state(net) if a.quantize else
                             {k: v.detach().cpu().clone() for k, v in net.state_dict().items()})
        rm = record(m, r)
        if recorder is not None and self.main_rank:
            rm["seed_log"] = seedlog_ft.finish(recorder, a.out, seed, m)
        self.say(f"{LABELS[m]} (lr {r.lr:g}): {r.steps} steps, {r.queries:,} queries, train loss "
                 f"{rm['train_loss']:.4f}, val acc {rm['val_acc']:.3f}, test acc {rm['test_acc']:.3f} (start "
                 f"{cur['start']['test_acc']:.3f}), {rm['wall_s']:.0f} s"
                 + ("  (DIVERGED: loss not finite)" if r.diverged else ""))
        return rm

    def run_seed(self, seed: int) -> dict:
        """Every method on this seed from the same start; returns the seed's entry of results.json."""
        a, t_seed = self.a, time.perf_counter()
        info = self.prepare(seed)
        data, enc, net, summary = info["data"], info["enc"], info["net"], info["summary"]
        cfg = self.config(seed)
        self.say(f"zo-finetune: {summary['architecture']} ({a.head} head, {summary['tuning']} FT: "
                 f"{summary['params_trainable']:,} of {summary['params_total']:,} params trained, {a.dtype}) on "
                 f"{data.name}: {a.n_train}/{a.n_val}/{a.n_test} examples, {data.num_labels} labels, max "
                 f"{a.max_length} tokens (mean {enc['train'].mean_tokens():.1f}); device {self.device}, "
                 f"{self.threads} threads; seed {seed}; ZO budget {self.queries:,} queries each, objective "
                 f"{a.objective}")
        if data.meta.get("dropped_rows"):
            self.say(f"data: {data.meta['rows']:,} rows, {data.n_available:,} kept; dropped "
                     + ", ".join(f"{n:,} {why.replace('_', ' ')}" for why, n in data.meta["dropped_rows"].items()))
        for m in self.methods:      # a budget below one step of a method: refused before any training
            if is_zo(m):
                MethodRun(m, net, self.trainable(net), enc, cfg, {}, progress=False)
        grad = [m for m in self.methods if not is_zo(m) or METHODS[m].differentiates]
        if a.objective != "loss" and grad:
            self.say(f"note: --objective {a.objective} applies to the ZO methods; first-order and forward-gradient "
                     f"methods ({', '.join(grad)}) keep cross-entropy (they need a derivative)")
        init_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        cur = self._start(seed, net, enc, cfg)
        start = cur["start"]
        self.say(f"start (zero-shot, {a.head} head): train loss {start['train_loss']:.4f}, "
                 f"test acc {start['test_acc']:.3f}")
        recipe = self.log_recipe(seed, info) if a.save_log else None
        results = {}
        for m in self.methods:
            if m in cur["done"]:
                results[m] = cur["done"][m]
                self.say(f"{LABELS[m]}: done before the resume")
                continue
            net.load_state_dict(init_state)
            results[m] = self._run_method(m, seed, net, enc, cfg, cur, recipe)
            if self.checkpointing:
                cur["done"][m] = results[m]
                cur["active"] = None
                self.save_state()
        self.info = info
        # seed_wall_s: loading, start evaluation and every method of this seed (this process only)
        return {"seed": seed, "start": start, "start_eval_s": cur["start_eval_s"], "methods": results,
                "seed_wall_s": time.perf_counter() - t_seed}

    # ------------------------------------------------------------ memory
    def measure_memory(self, info: dict) -> dict:
        """Peak memory: one process per kind, on the same fixed batch (the first training batch,
        padded to max length)."""
        a, enc = self.a, info["enc"]
        batch_file = os.path.join(a.out, "memory_batch.pt")
        b = enc["train"].batch(range(min(a.batch_size, len(enc["train"]))), pad_to=a.max_length)
        files.torch_save(batch_file, {k: v.cpu() for k, v in b.items()})
        cfg0 = self.config(self.seeds[0], distributed=False)
        spec = {"model": self.model_path, "num_labels": info["data"].num_labels, "dtype": a.dtype,
                "device": self.device, "seed": self.seeds[0], "partial": a.partial, "bitfit": a.bitfit,
                "peft": None if self.peft_spec is None else asdict(self.peft_spec), "batch_file": batch_file,
                "threads": self.threads, "head": a.head, "descriptions": info["descriptions"],
                "temperature": a.temperature, "steps": max(a.memory_steps, cfg0.option("q") + 1),
                "quantize": a.quantize, "train": a.train,
                "cfg": asdict(cfg0)}
        memory = mem_mod.measure_all(["runtime", "inference"] + self.methods, spec,
                                     workers=1 if self.device.startswith("cuda") else self.threads)
        try:
            os.remove(batch_file)
        except OSError:
            pass
        for k in [k for k, v in memory.items() if "error" in v]:
            self.say(f"memory measurement for {k} failed: {memory[k]['error']}")
        return memory

    # --------------------------------------------------------------- run
    def run(self) -> dict:
        try:
            return self._run()
        finally:
            self.release()

    def _run(self) -> dict:
        a, state = self.a, self.state
        runs = list(state["runs"]) if state is not None else []
        done_seeds = {r["seed"] for r in runs}
        self.info = None
        for seed in self.seeds:
            if seed in done_seeds:
                continue
            runs.append(self.run_seed(seed))
            if self.checkpointing:
                state["runs"] = runs
                state["current"] = None
                self.save_state()
        info = self.info
        if info is None:            # every seed was done before the resume: only the report is left
            info = self.prepare(self.seeds[0])
        memory = {} if a.no_memory else self.measure_memory(info)
        return self.report(runs, info, memory)

    def report(self, runs: list, info: dict, memory: dict) -> dict:
        """results.json, curves.png and the printed table."""
        a, data, enc = self.a, info["data"], info["enc"]
        total = time.perf_counter() - self.t_start
        agg = report.aggregate(runs)
        tab = report.table(agg, memory)
        device, threads = self.device, self.threads
        machine = f"{cpu_name()}, {threads} threads" if device == "cpu" else torch.cuda.get_device_name(device)
        model_name = "all-MiniLM-L6-v2" if a.model is None else os.path.basename(str(a.model).rstrip("/"))
        out = {"config": {**vars(a), "methods": self.methods, "seeds": self.seeds, "queries": self.queries,
                          "model_path": self.model_path, "model_name": model_name, "dataset_name": data.name,
                          "labels": data.label_names, "label_descriptions": info["descriptions"],
                          "threads": threads, "argv": self.argv},
               "machine": {"cpu": cpu_name(), "device": device, "threads": threads,
                           "python": platform.python_version(), "torch": torch.__version__,
                           "platform": platform.platform(), "zo_backend": _backend_name(), "name": machine},
               "model": info["summary"], "data": {"n_available": data.n_available, **data.meta,
                                                  "mean_train_tokens": enc["train"].mean_tokens()},
               # single-seed layout kept: "start" / "methods" are the first seed's; "runs" has every seed
               "start": runs[0]["start"], "start_eval_s": runs[0]["start_eval_s"], "methods": runs[0]["methods"],
               "runs": runs, "summary": agg, "memory": memory, "total_wall_s": total, "table": tab}
        out["config"]["world_size"] = zdist.get_world_size()
        if self.main_rank:
            files.write_json(os.path.join(a.out, "results.json"), out)
            report.plot(agg, os.path.join(a.out, "curves.png"), report.plot_title(out["config"], out["machine"]))
        say = self.say
        say("")
        say(tab)
        say("")
        say("to MeZO peak: the first eval point whose test accuracy reaches MeZO's best eval point (after the "
            "start) of the same seed; training seconds exclude evaluation"
            + ("" if len(self.seeds) == 1 else "; mean over the seeds that reach it"))
        say("memory: peak RSS of one process per method during a few steps on one batch of "
            f"{a.batch_size} x {a.max_length} tokens; 'x inf' = / inference process, 'x inf-rt' = the same "
            f"after subtracting the runtime baseline (imports, tokenizer, model code; no weights: "
            f"{memory.get('runtime', {}).get('peak_rss_mb', float('nan')):.0f} MB)" if memory else "memory: skipped")
        say(f"total wall time {total:.0f} s; wrote {os.path.join(a.out, 'results.json')} and "
            f"{os.path.join(a.out, 'curves.png')}")
        return out
