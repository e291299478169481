"""Shared pieces of the paper toys (least_squares.py, mlp_digits.py): the three methods, the
training loop with its query count, the step budgets, and the CSV / plot writing.

Queries: one forward pass of one example.  MeZO 2·batch per step, MeZO-SVRG 2·N_full on full
steps and 4·batch otherwise, FO-SGD batch per step (backward not counted).
"""
from __future__ import annotations

import argparse
import csv
import io
import os
from dataclasses import dataclass

import torch

from zo_kernels.finetune import files
from zo_kernels.optim import MeZO, MeZOSVRG

METHODS = ("mezo-svrg", "mezo", "fo-sgd")
LABELS = {"mezo-svrg": "MeZO-SVRG", "mezo": "MeZO", "fo-sgd": "FO-SGD"}
COLORS = {"mezo-svrg": "tab:red", "mezo": "tab:blue", "fo-sgd": "tab:gray"}


def make_optimizer(method: str, params, *, mu: float, lr_mezo: float, lr1: float, lr2: float, q: int,
                   lr_sgd: float, seed: int, anchor: str, backend):
    if method == "mezo":
        return MeZO(params, lr=lr_mezo, eps=mu, seed=seed, backend=backend)
    if method == "mezo-svrg":
        return MeZOSVRG(params, lr=lr2, lr_full=lr1, eps=mu, q=q, seed=seed, anchor=anchor, backend=backend)
    if method == "fo-sgd":
        return torch.optim.SGD(params, lr=lr_sgd)
    raise ValueError(f"unknown method {method!r}; one of {METHODS}")


def train(method: str, opt, f, n: int, steps: int, *, batch: int, full: int, gen: torch.Generator, record,
          eval_every: int, log_evals: int, f_all=None) -> None:
    """`steps` steps of `opt` on the minibatch loss f(idx) over n examples; full steps of MeZO-SVRG
    use `full` examples (f_all, when given, for the whole set).  record(step, queries) is called at
    step 0, every eval_every steps, at the last step and at log_evals geometrically spaced steps."""
    queries = 0
    # log_evals extra evaluation points spaced geometrically, so the start shows on log axes
    extra = {int(round(steps ** (i / log_evals))) for i in range(1, log_evals + 1)} if log_evals else set()
    record(0, queries)
    for t in range(1, steps + 1):
        idx = torch.randint(0, n, (batch,), generator=gen)
        if method == "fo-sgd":
            opt.zero_grad(set_to_none=True)
            f(idx).backward()
            opt.step()
            queries += batch
        elif method == "mezo":
            opt.step(lambda: f(idx))
            queries += 2 * batch
        elif opt.is_full_step:
            fidx = torch.arange(n) if full == n else torch.randperm(n, generator=gen)[:full]
            opt.step(None, full_closure=f_all if f_all is not None and full == n else (lambda: f(fidx)))
            queries += 2 * full
        else:
            opt.step(lambda: f(idx))
            queries += 4 * batch
        if t % eval_every == 0 or t == steps or t in extra:
            record(t, queries)


def svrg_queries(steps: int, q: int, n_full: int, batch: int) -> int:
    full = (steps + q - 1) // q
    return full * 2 * n_full + (steps - full) * 4 * batch


def method_steps(method: str, steps: int, total_q: int, batch: int, equal_steps: bool) -> int:
    """MeZO-SVRG runs `steps`; MeZO and FO-SGD run SVRG's query budget total_q (or `steps`)."""
    if method == "mezo-svrg" or equal_steps:
        return steps
    return total_q // (2 * batch if method == "mezo" else batch)


def write_csv(path: str, header, rows) -> None:
    """Atomically (temporary file + rename): a failed write leaves an earlier file whole."""
    buf = io.StringIO(newline="")
    wr = csv.writer(buf)
    wr.writerow(header)
    wr.writerows(rows)
    files.write_bytes(path, buf.getvalue().encode())


def plot_runs(ax, rows, xkey: int, ykey: int, max_steps: int) -> None:
    """One line per (method, seed) of rows [method, seed, step, queries, ...]: column ykey against
    column xkey (2: steps, up to max_steps; 3: queries, from the first step on)."""
    for m in METHODS:
        seeds = sorted({r[1] for r in rows if r[0] == m})
        for i, s in enumerate(seeds):
            pts = [r for r in rows if r[0] == m and r[1] == s and
                   (r[3] > 0 if xkey == 3 else r[2] <= max_steps)]
            ax.plot([p[xkey] for p in pts], [p[ykey] for p in pts], color=COLORS[m], alpha=0.8, lw=1.2,
                    label=LABELS[m] if i == 0 else None)


XLABELS = {2: "steps", 3: "queries (forward passes of one example)"}


def panel(ax, rows, xkey: int, ykey: int, max_steps: int, ylabel: str, *, logy: bool) -> None:
    """plot_runs on one panel, with the axes every toy uses: log queries, linear steps, a grid."""
    plot_runs(ax, rows, xkey, ykey, max_steps)
    ax.set_xscale("log" if xkey == 3 else "linear")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(XLABELS[xkey])
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")


def rates(args) -> str:
    """Each method's rates and the seed count, for a figure's title."""
    return (f"MeZO lr {args.lr_mezo}; MeZO-SVRG η1={args.lr1} η2={args.lr2} q={args.q}; FO-SGD lr {args.lr_sgd}; "
            f"{args.seeds} seeds")


def common_args(description: str, name: str, *, steps: int, seeds: int, lr_mezo: float, lr1: float, lr2: float,
                lr_sgd: float, full_help: str) -> argparse.ArgumentParser:
    """The options every toy has: step budget, seeds, batch, μ, each method's rates, q, the full batch,
    the anchor mode, equal steps, the backend and the output folder (runs/<name>)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--steps", type=int, default=steps, help="MeZO-SVRG steps")
    ap.add_argument("--seeds", type=int, default=seeds)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--mu", type=float, default=1e-3)
    ap.add_argument("--lr-mezo", type=float, default=lr_mezo)
    ap.add_argument("--lr1", type=float, default=lr1, help="MeZO-SVRG η1 (full steps)")
    ap.add_argument("--lr2", type=float, default=lr2, help="MeZO-SVRG η2 (minibatch steps)")
    ap.add_argument("--q", type=int, default=2)
    ap.add_argument("--lr-sgd", type=float, default=lr_sgd)
    ap.add_argument("--full-batch", type=int, default=0, help=full_help)
    ap.add_argument("--anchor", choices=("dense", "replay"), default="dense")
    ap.add_argument("--equal-steps", action="store_true",
                    help="run every method for --steps steps (default: MeZO / FO-SGD match SVRG's queries)")
    ap.add_argument("--backend", default=None)
    ap.add_argument("--out", default=os.path.join("runs", name))
    return ap


@dataclass(frozen=True)
class Panel:
    """One panel of a toy's figure: column ykey against column xkey of the rows (see plot_runs)."""

    xkey: int
    ykey: int
    ylabel: str
    title: str
    logy: bool = False
    optimum: bool = False  # a dashed line at 1.0 (the loss is shown over its optimum f*)


def figure(n: int, width: float, height: float = 4.2):
    """A figure with a row of n panels (matplotlib without a display): (fig, axes)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, n, figsize=(width, height))


def save_figure(fig, path: str, title: str, fontsize: int = 9) -> str:
    """Title, lay out and write `fig` as PNG to `path` atomically (temporary file + rename); returns path."""
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=fontsize)
    fig.tight_layout()
    try:
        files.save_figure(fig, path, dpi=110)
    finally:
        plt.close(fig)
    return path


def plot_figure(rows, args, path: str, panels, caption: str, width: float) -> str:
    """A row of `panels`, the first with the legend, titled with `caption` and every method's rates;
    written to `path` (returned)."""
    fig, axes = figure(len(panels), width)
    for ax, p in zip(axes, panels):
        panel(ax, rows, p.xkey, p.ykey, args.steps, p.ylabel, logy=p.logy)
        if p.optimum:
            ax.axhline(1.0, color="k", ls="--", lw=0.8, label="optimum f*")
        ax.set_title(p.title)
    axes[0].legend()
    return save_figure(fig, path, f"{caption}; {rates(args)}")
