"""Running the ranking's zo-finetune runs: each in its own directory, skipped when finished, resumed from
its checkpoint when killed, `lanes` at a time.

A run is finished when DIR/results.json exists -- zo-finetune writes it last, atomically (temporary file
+ rename), so it is never torn -- and was made with the run's own arguments (else the run is refused with
one line and nothing is overwritten).  A directory without it is incomplete: when it holds a
checkpoint.pt of the same arguments (zo-finetune --checkpoint-every writes one atomically every N steps
and after the method), `zo-finetune --resume DIR` continues it and ends bit-identical to an uninterrupted
run; otherwise, or when the resume fails, the run starts over.  A finished run's checkpoint.pt (weights and
optimizer state) is deleted.  Each run's output goes to DIR/zo-finetune.log.

With lanes > 1 the runs are separate processes side by side (each with --threads 1, set by the plan).
Ctrl-C stops them all (each zo-finetune exits cleanly); a rerun continues.
"""
from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .. import checkpoint, files, merge
from ..cli import build_parser
from ..errors import FinetuneError
from .choice import choose, grid_records
from .plan import TUNE_SEED, Plan, Run

RESULTS = "results.json"
LOG = "zo-finetune.log"
_FREE = ("out", "no_progress")      # settings that may differ between a finished run and its rerun

Runner = Callable[[List[str], str], int]        # (zo-finetune arguments, log file) -> exit code


class SubprocessRunner:
    """zo-finetune in a child process of this Python, with this checkout's zo_kernels first on its path."""

    def __init__(self):
        self._live: set = set()
        self._lock = threading.Lock()
        self.stopping = False

    def __call__(self, argv: List[str], log_path: str) -> int:
        import zo_kernels

        root = os.path.dirname(os.path.dirname(os.path.abspath(zo_kernels.__file__)))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        with open(log_path, "ab") as log:
            with self._lock:
                if self.stopping:
                    return 130
                p = subprocess.Popen([sys.executable, "-m", "zo_kernels.finetune", *argv], stdout=log,
                                     stderr=subprocess.STDOUT, env=env)
                self._live.add(p)
            try:
                return p.wait()
            finally:
                with self._lock:
                    self._live.discard(p)

    def stop(self) -> None:
        """Interrupt every live run (zo-finetune exits 130 on SIGINT, its files whole) and start no more."""
        with self._lock:
            self.stopping = True
            for p in self._live:
                p.send_signal(signal.SIGINT)


def _settings(argv: Sequence[str]) -> Optional[dict]:
    try:
        a = build_parser().parse_args([str(x) for x in argv])
    except SystemExit:
        return None
    return {k: v for k, v in vars(a).items() if k not in _FREE}


def differences(stored: Sequence[str], argv: Sequence[str]) -> List[str]:
    """The zo-finetune settings in which argument lists `stored` and `argv` differ (--out aside)."""
    a, b = _settings(stored), _settings(argv)
    if a is None or b is None:
        return ["(unreadable arguments)"]
    return sorted(k for k in a if a[k] != b[k])


def _remove(p: str) -> None:
    try:
        os.remove(p)
    except FileNotFoundError:
        pass


def status(run: Run) -> str:
    """"done", "resume" or "fresh" (see the module docstring); a finished run with other settings: FinetuneError."""
    if os.path.exists(os.path.join(run.dir, RESULTS)):
        diff = differences(merge.load(run.dir)["config"].get("argv") or [], run.argv)
        if diff:
            raise FinetuneError(f"{os.path.join(run.dir, RESULTS)} was made with other settings ({', '.join(diff)}); "
                                f"rank into another --out or remove that directory")
        return "done"
    if checkpoint.find(run.dir):
        try:
            state = checkpoint.load(run.dir)
        except FinetuneError:
            return "fresh"
        if not differences(state["argv"], run.argv):
            return "resume"
    return "fresh"


def execute_one(run: Run, runner: Runner) -> Tuple[str, Optional[str]]:
    """Bring one run to its results.json: (what was done, None) or (what was done, the error line)."""
    try:
        st = status(run)
        if st == "done":
            return "finished before", None
        files.check_writable(run.dir)
    except FinetuneError as e:
        return "refused", str(e)
    log, res = os.path.join(run.dir, LOG), os.path.join(run.dir, RESULTS)
    what = "ran"
    if st == "resume":
        if runner(["--resume", run.dir, "--no-progress"], log) == 0 and os.path.exists(res):
            _remove(checkpoint.path(run.dir))
            return "resumed from its checkpoint", None
        what = "resume failed, ran again"
    _remove(checkpoint.path(run.dir))       # another run's or a failed resume's: not this run's start
    rc = runner(list(run.argv), log)
    if rc != 0 or not os.path.exists(res):
        return what, f"{run.dir}: zo-finetune exited with code {rc} (its output: {log})"
    _remove(checkpoint.path(run.dir))
    return what, None


def execute(plan: Plan, runner: Optional[Runner] = None, say=print) -> Dict[str, List[str]]:
    """Every run of `plan`, `plan.lanes` at a time: a method's grid, then its chosen rate at the other seeds.
    The seed runs of a method whose grid has finished go ahead of the grid runs still waiting, so methods
    are ranked one after another (an interrupted ranking has whole entries, not only grids).
    Returns each method's error lines (none: every run of it finished)."""
    runner = SubprocessRunner() if runner is None else runner
    errors: Dict[str, List[str]] = {m: [] for m in plan.methods}
    grid_left = {m: len(plan.grids[m].factors) for m in plan.methods}
    count = [0]
    waiting = collections.deque(r for m in plan.methods for r in plan.grid(m))

    def one(run: Run):
        t0 = time.perf_counter()
        return (*execute_one(run, runner), time.perf_counter() - t0)

    ex = ThreadPoolExecutor(plan.lanes)
    futures: Dict = {}
    try:
        while waiting or futures:
            while waiting and len(futures) < plan.lanes:
                r = waiting.popleft()
                futures[ex.submit(one, r)] = r
            finished, _ = wait(futures, return_when=FIRST_COMPLETED)
            for f in finished:
                run = futures.pop(f)
                what, err, dt = f.result()
                count[0] += 1
                say(f"[{count[0]}/{plan.n_runs()}] {run.method} lr {run.lr:.6g} seed {run.seed}: {what}"
                    + (f" in {dt:.0f} s" if what != "finished before" else "") + (f" -- {err}" if err else ""))
                if err:
                    errors[run.method].append(err)
                if run.seed != TUNE_SEED:
                    continue
                grid_left[run.method] -= 1
                if grid_left[run.method] == 0 and not errors[run.method]:
                    best = choose(grid_records(plan, run.method))
                    say(f"{run.method}: rate {best.lr:.6g} (grid factor {best.factor:g}) by validation accuracy")
                    waiting.extendleft(reversed([r for r in plan.seed_runs(run.method, best.factor)
                                                 if r.seed != TUNE_SEED]))
    except BaseException:
        stop = getattr(runner, "stop", None)
        if stop is not None:
            stop()
        ex.shutdown(wait=True, cancel_futures=True)
        raise
    ex.shutdown(wait=True)
    return {m: e for m, e in errors.items() if e}
