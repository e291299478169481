"""Python side of scripts/gpu_check.sh: the environment report, the fine-tuning part, the dry-run
stand-in of a CUDA command, and the summary writer.

    python scripts/gpu_check_tools.py env JSON            # versions, GPU, compilers -> JSON (and stdout)
    python scripts/gpu_check_tools.py finetune DIR [--shape S] [--want M,...] -- ARGS
                                                          # zo-finetune ARGS on a synthetic task in DIR
    python scripts/gpu_check_tools.py seedlog             # a CPU-made seed log replayed on the GPU
    python scripts/gpu_check_tools.py quant               # QZO on an NF4 (bitsandbytes) model on the GPU
    python scripts/gpu_check_tools.py dry-run ARGV...     # run `python ARGV...` up to its first CUDA call
    python scripts/gpu_check_tools.py summary PARTS ENV JUNIT_DIR OUT.json [--dry-run] [--budget S]

dry-run: ARGV is what the real check would pass to python (a script path, or -m module, then its
arguments).  It runs for real on a machine without a GPU, with torch.cuda pretending a device is there
(is_available() is True) and every call that would initialise CUDA raising ReachedCuda instead.  Exit 0
when the command got that far (its arguments parsed, its files and imports worked); its own exit code
when it stopped earlier; 3 when it finished without touching CUDA (it would not have tested the GPU).
"""
from __future__ import annotations

import csv
import glob
import json
import math
import os
import platform
import runpy
import shutil
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from typing import List, Optional

VERSIONED = ("torch", "triton", "transformers", "numpy", "setuptools", "ninja", "pytest")


class ReachedCuda(BaseException):
    """Raised at the first CUDA call of a dry run.  A BaseException, so `except Exception` blocks
    of the command under test (which turn load errors into messages) do not swallow it."""


# ------------------------------------------------------------------------------------------- env
def _version(dist: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _first_line(cmd: List[str]) -> Optional[str]:
    exe = shutil.which(cmd[0])
    if exe is None:
        return None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{exe}: {e}"
    return out[-1] if out else exe


def env(path: str) -> int:
    import sysconfig

    import torch

    info = {"python": platform.python_version(), "executable": sys.executable, "machine": platform.machine(),
            "python_h": os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h")),
            "versions": {d: _version(d) for d in VERSIONED}, "torch_cuda": torch.version.cuda,
            "nvcc": _first_line(["nvcc", "--version"]), "nvcc_path": shutil.which("nvcc"),
            "cuda_home": os.environ.get("CUDA_HOME"), "cxx": _first_line(["c++", "--version"]),
            "nvidia_smi": _first_line(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                       "--format=csv,noheader"]),
            "cpus": os.cpu_count()}
    with open(path, "w") as f:  # written before the first CUDA call, so a dry run leaves it too
        json.dump(info, f, indent=1)
    info["cuda_available"] = torch.cuda.is_available()
    if info["cuda_available"]:
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
                       "memory_gib": round(p.total_memory / 2**30, 1)}
    with open(path, "w") as f:
        json.dump(info, f, indent=1)
    print(json.dumps(info, indent=1))
    return 0 if info["cuda_available"] else 1


# -------------------------------------------------------------------------------------- finetune
def finetune(argv: List[str]) -> int:
    """zo-finetune on a synthetic task (the lent machine has neither the default model nor its data),
    with the methods of WANTED that zo-finetune accepts at run time (methods added later are picked up
    without editing the check).  One process: writing the task and the run share their imports."""
    import argparse

    ap = argparse.ArgumentParser(prog="gpu_check_tools.py finetune")
    ap.add_argument("task_dir")
    ap.add_argument("--shape", default="minilm")
    ap.add_argument("--want", default="mezo,mezo-svrg,lozo,fo-sgd")
    cut = argv.index("--") if "--" in argv else len(argv)
    a = ap.parse_args(argv[:cut])
    rest = argv[cut + 1:]  # zo-finetune's arguments
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import synthetic_task

    from zo_kernels.finetune.cli import main as zo_finetune
    from zo_kernels.finetune.registry import METHODS

    model = synthetic_task.write_model(os.path.join(a.task_dir, "model"), shape=synthetic_task.SHAPES[a.shape])
    data = synthetic_task.write_data(os.path.join(a.task_dir, "data.csv"))
    wanted = a.want.split(",")
    have = [m for m in wanted if m in METHODS]
    missing = [m for m in wanted if m not in METHODS]
    print(f"synthetic task ({a.shape}): {model}, {data}; methods {','.join(have)}"
          + (f"; zo-finetune does not accept {','.join(missing)} (yet)" if missing else ""), flush=True)
    if not have:
        return 1
    return zo_finetune(["--model", model, "--dataset", data, "--methods", ",".join(have)] + rest)


# -------------------------------------------------------------------------------------- seedlog
def seedlog(argv: List[str]) -> int:
    """A seed log made on the CPU (MeZO, 100 steps, fp32 and bf16) replayed on the GPU: equal bits, or
    the largest difference from the CPU-trained weights (docs/seedlog.md, "Bit-identity")."""
    import torch

    from zo_kernels import last_backend, optim
    from zo_kernels.seedlog import Recorder, load_log, replay_log

    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        def make():
            torch.manual_seed(0)
            return torch.nn.Sequential(torch.nn.Linear(384, 384), torch.nn.Tanh(), torch.nn.Linear(384, 2)).to(dtype)

        net = make()
        opt = optim.MeZO(net.parameters(), lr=1e-3, record=True, backend="cpu")
        rec = Recorder(opt, net.named_parameters(), base={"name": "mlp"})
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(32, 384, generator=g).to(dtype), torch.randint(0, 2, (32,), generator=g)
        for _ in range(100):
            opt.step(lambda: torch.nn.functional.cross_entropy(net(x).float(), y))
        log = load_log(rec.encode())
        gpu = make().to("cuda")
        same = replay_log(gpu.named_parameters(), log, check_final=False) == log.header["final_sha256"]
        diff = max(float((p.detach().cpu().double() - q.detach().double()).abs().max())
                   for p, q in zip(gpu.parameters(), net.parameters()))
        rows.append({"dtype": str(dtype), "replay_backend": last_backend(), "equal_bits": same,
                     "max_abs_diff": diff, "log_bytes": log.size})
        print(json.dumps(rows[-1]), flush=True)
    return 0


# -------------------------------------------------------------------------------------- quant
def quant(argv: List[str]) -> int:
    """The NF4 path on CUDA (docs/quantized.md): a small random BERT quantized by bitsandbytes on the
    GPU, 20 MeZO steps of QZO (scales + norms + biases + head): the integer codes must stay
    bit-identical, the loss finite, and the quantized forward close to the same model's on the CPU."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from zo_kernels import optim
    from zo_kernels import quant as q
    from zo_kernels.finetune.quantize import scale_trainable

    def make(device):
        cfg = BertConfig(vocab_size=100, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=256, max_position_embeddings=64, num_labels=2)
        torch.manual_seed(0)
        net = BertForSequenceClassification(cfg).eval().to(device)
        q.quantize_(net, "nf4")
        return net

    g = torch.Generator().manual_seed(1)
    ids, y = torch.randint(0, 100, (16, 24), generator=g), torch.arange(16) % 2
    with torch.no_grad():
        cpu_logits = make("cpu")(input_ids=ids).logits
    net = make("cuda")
    ids, y = ids.cuda(), y.cuda()
    codes = {k: v.clone() for k, v in q.integer_codes(net).items()}
    trainable = scale_trainable(net)
    opt = optim.MeZO(trainable, lr=1e-3, eps=1e-3)
    losses = []
    with torch.no_grad():
        gpu_logits = net(input_ids=ids).logits
        for _ in range(20):
            losses.append(float(opt.step(lambda: torch.nn.functional.cross_entropy(net(input_ids=ids).logits, y))))
    same = all(torch.equal(codes[k], v) for k, v in q.integer_codes(net).items())
    row = {"scales_dtype": str(q.scale_parameters(net)[0][1].dtype), "trainable": sum(p.numel() for p in trainable),
           "codes_bit_identical": same, "loss_first": losses[0], "loss_last": losses[-1],
           "cpu_vs_cuda_logits_max_diff": float((gpu_logits.cpu() - cpu_logits).abs().max())}
    print(json.dumps(row), flush=True)
    return 0 if same and all(map(math.isfinite, losses)) else 1


# --------------------------------------------------------------------------------------- dry run
def _pretend_cuda() -> None:
    import torch

    def reached(name):
        def stop(*args, **kwargs):
            where = "".join(traceback.format_stack(limit=4)[:-1]).rstrip()
            raise ReachedCuda(f"torch.cuda.{name}\n{where}")
        return stop

    torch.cuda.is_available = lambda: True
    # _lazy_init is what creating or moving a CUDA tensor calls first; the rest are the queries the
    # commands make before they allocate anything.
    for name in ("_lazy_init", "get_device_name", "get_device_properties", "get_device_capability",
                 "synchronize", "set_device", "current_device", "mem_get_info"):
        setattr(torch.cuda, name, reached(name))


def dry_run(argv: List[str]) -> int:
    if not argv:
        print("dry-run: no command", file=sys.stderr)
        return 2
    _pretend_cuda()
    t0 = time.perf_counter()
    old_argv = sys.argv
    try:
        if argv[0] == "-m":
            sys.argv = [argv[1]] + argv[2:]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
            runpy.run_path(argv[0], run_name="__main__")
    except ReachedCuda as e:
        print(f"dry-run: OK, reached the first CUDA call after {time.perf_counter() - t0:.1f} s: {e}")
        return 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if code:
            print(f"dry-run: FAILED, the command exited {code} before any CUDA call", file=sys.stderr)
            return code
    finally:
        sys.argv = old_argv
    print("dry-run: FAILED, the command finished without any CUDA call (it would not test the GPU)",
          file=sys.stderr)
    return 3


# --------------------------------------------------------------------------------------- summary
@dataclass
class TestCounts:
    passed: int = 0
    failed: int = 0
    errors: int = 0
    skipped: int = 0
    failures: List[str] = field(default_factory=list)  # the first few ids that failed or errored


@dataclass
class Part:
    name: str
    status: str          # pass, fail, timeout, skipped
    rc: Optional[int]
    seconds: float
    limit_s: float
    command: str
    tests: Optional[TestCounts] = None


def junit_counts(path: str, keep: int = 20) -> TestCounts:
    c = TestCounts()
    for case in ET.parse(path).getroot().iter("testcase"):
        kinds = {child.tag for child in case}
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        if "failure" in kinds or "error" in kinds:
            if "failure" in kinds:
                c.failed += 1
            else:
                c.errors += 1
            if len(c.failures) < keep:
                c.failures.append(name)
        elif "skipped" in kinds:
            c.skipped += 1
        else:
            c.passed += 1
    return c


def read_parts(path: str, junit_dir: str) -> List[Part]:
    parts = []
    if not os.path.exists(path):
        return parts
    with open(path, newline="") as f:
        for row in csv.reader(f, delimiter="\t"):
            name, status, rc, seconds, limit, command = row
            junit = os.path.join(junit_dir, f"{name}.xml")
            tests = junit_counts(junit) if os.path.exists(junit) else None
            parts.append(Part(name, status, int(rc) if rc else None, float(seconds), float(limit), command, tests))
    return parts


def summary(parts_tsv: str, env_json: str, junit_dir: str, out: str, dry: bool, budget: float,
            total: float) -> int:
    parts = read_parts(parts_tsv, junit_dir)
    info = {}
    if os.path.exists(env_json):
        with open(env_json) as f:
            info = json.load(f)
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        commit = None
    doc = {"ok": bool(parts) and all(p.status == "pass" for p in parts), "dry_run": dry,
           "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "total_s": round(total, 1),
           "budget_s": budget, "commit": commit, "env": info, "parts": [asdict(p) for p in parts],
           "outputs": sorted(os.path.relpath(p, os.path.dirname(os.path.abspath(out)))
                             for p in glob.glob(os.path.join(os.path.dirname(os.path.abspath(out)), "**", "*"),
                                                recursive=True) if os.path.isfile(p))}
    with open(out, "w") as f:
        json.dump(doc, f, indent=1)
    width = max((len(p.name) for p in parts), default=4)
    for p in parts:
        t = p.tests
        tests = f"  tests: {t.passed} passed, {t.failed} failed, {t.errors} errors, {t.skipped} skipped" if t else ""
        print(f"{p.name:{width}s}  {p.status:8s} {p.seconds:7.1f} s of {p.limit_s:g}{tests}")
    print(f"gpu_check: {'OK' if doc['ok'] else 'NOT OK'} in {total:.0f} s; summary {out}")
    return 0 if doc["ok"] else 1


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "env" and len(rest) == 1:
        return env(rest[0])
    if cmd == "finetune":
        return finetune(rest)
    if cmd == "seedlog":
        return seedlog(rest)
    if cmd == "quant":
        return quant(rest)
    if cmd == "dry-run":
        return dry_run(rest)
    if cmd == "summary" and len(rest) >= 4:
        import argparse

        ap = argparse.ArgumentParser(prog="gpu_check_tools.py summary")
        ap.add_argument("parts")
        ap.add_argument("env")
        ap.add_argument("junit_dir")
        ap.add_argument("out")
        ap.add_argument("--dry-run", action="store_true")
        ap.add_argument("--budget", type=float, default=0.0)
        ap.add_argument("--total", type=float, default=0.0)
        a = ap.parse_args(rest)
        return summary(a.parts, a.env, a.junit_dir, a.out, a.dry_run, a.budget, a.total)
    print(f"gpu_check_tools.py: bad arguments {argv}\n{__doc__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
