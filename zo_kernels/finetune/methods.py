"""The built-in methods of `zo-finetune` and `ZOTrainer`: MeZO, MeZO-SVRG, ZO-Bench's family, LOZO,
forward gradient (zo_kernels.optim) and the first-order SGD / Adam baselines, each one registry
entry with its knobs (zo_kernels.finetune.registry).

Default learning rates of the ZO methods beyond MeZO / MeZO-SVRG are MeZO's matched through each
update rule (docs/zo_bench.md, "Default learning rates"): n-SPSA q·lr (1/q of the variance per
step: the MeZO paper's n/(n + d − 1) effective rate); Sign and Adam lr·GRAD_SCALE (steps
normalised by |c|); Cons lr; momentum (1 − β)·lr (its steady-state drift is lr/(1 − β)); LOZO /
LOZO-M lr/r (Var(Z_ij) = r); forward-grad lr (c is ∇f·z itself); FZOO lr·GRAD_SCALE (its step
Σ c_i z_i ≈ ∇f/|∇f| is normalised by the spread σ ≈ μ|∇f| of its losses, like Sign's); MeZO with layer
sampling lr/ρ (the same expected step and per-coordinate variance per step as MeZO: a tensor is
drawn with probability ρ and then moved 1/ρ as far, docs/fzoo.md); HiZOO lr (σ = h^(-1/2) starts at 1).
Each has its own --lr-* flag.

--noise picks the directions' form (Gaussian, or Rademacher ±1) for every ZO method but LOZO (its U Vᵀ
factors are Gaussian) and FZOO, whose own --fzoo-noise defaults to the paper's ±1.

Forward gradient is charged `fg_query_cost` (default 2) queries per example of its one jvp:
the jvp carries the primal and a tangent through every layer (each linear layer computes
W·x, W·ẋ and Ẇ·x: two to three forward passes' arithmetic), and at 2 it takes exactly MeZO's
steps on MeZO's batches, so "equal queries" compares one exact directional derivative with
one finite-difference estimate of it, per step, and never gives the jvp more compute than
MeZO's two forwards.  ZO-Bench's count (one forward with jvp = 1) is `fg_query_cost=1`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..noise import NOISE_FORMS
from .errors import FinetuneError
from .registry import Knob, Method, import_optim, is_full_step, register, zo_extra

if TYPE_CHECKING:  # the registry imports this module, and config imports the registry
    from .config import TrainConfig

# The scale of the minibatch gradient at the default start, rms over batches of |∇f_B| (= rms of
# MeZO's coefficient c = (f+ − f−)/2μ ≈ ∇f_B·z): all-MiniLM-L6-v2, description head (T = 0.05),
# Rotten Tomatoes, batch 16, max 64 tokens, full fine-tuning, seed 0 (docs/zo_bench.md).  Sign and
# Adam normalise the step by it, so their lr is MeZO's times it; another setting has another scale.
GRAD_SCALE = 5.0
MMT_BETA = 0.9


def _rate(name: str, help: str, derive, rule: str, **kw) -> Knob:
    """A ZO learning rate derived from MeZO's when not given (docs/zo_bench.md)."""
    return Knob(name, None, help, derive=derive, rule=f"{rule} (derivations in docs/zo_bench.md)", minimum=0,
                rate=True, **kw)


# ------------------------------------------------------------------ knobs
LR_MEZO = Knob("lr_mezo", 1e-4, "MeZO lr (and the base the other ZO methods' rates are derived from)",
               minimum=0, rate=True)
LOOKAHEAD = Knob("lookahead", None, "MeZO: fold the next step's +mu z into the update pass (2 noise passes per "
                 "step, not 3)", type=bool, derive=lambda c: c.dtype == "float32",
                 rule="on for float32, off for bfloat16/float16 (which then get exact restore)",
                 trainer_default=False)
LR_SVRG = Knob("lr_svrg", 1e-4, "MeZO-SVRG minibatch lr (eta2)", minimum=0, rate=True)
LR_SVRG_FULL = Knob("lr_svrg_full", 5e-4, "MeZO-SVRG full-step lr (eta1)", minimum=0, rate=True,
                    trainer_name="lr_full", trainer_default=lambda c: 10.0 * c.option("lr_svrg"))
Q = Knob("q", 4, "MeZO-SVRG: a full (large-batch) step every q steps; n-spsa: directions per step", type=int,
         minimum=1, trainer_default=2)
LARGE_BATCH = Knob("large_batch", 128, "MeZO-SVRG: examples per full step (>= n-train: the whole training set; "
                   "Remark 3.3: a large batch instead of all)", type=int, minimum=1, trainer_name="")
ANCHOR = Knob("anchor", "dense", "MeZO-SVRG: the anchor's gradient as a dense buffer or replayed from seeds",
              type=str, choices=("dense", "replay"))
N_DIRECTIONS = Knob("n_directions", 1, "directions per step of the SPSA methods (mezo without lookahead, "
                    "zo-sgd-*, zo-adam; n-spsa takes --q)", type=int, minimum=1)
LR_N_SPSA = _rate("lr_n_spsa", "n-spsa lr", lambda c: c.option("q") * c.option("lr_mezo"), "--q times --lr-mezo")
LR_SIGN = _rate("lr_zo_sgd_sign", "zo-sgd-sign lr", lambda c: GRAD_SCALE * c.option("lr_mezo"),
                f"{GRAD_SCALE:g} x --lr-mezo (the gradient scale at the default start)")
LR_CONS = _rate("lr_zo_sgd_cons", "zo-sgd-cons lr", lambda c: c.option("lr_mezo"), "--lr-mezo")
MOMENTUM = Knob("momentum", MMT_BETA, "momentum beta of zo-sgd-mmt, zo-sgd-mmt-dense and lozo-m", minimum=0)
MOMENTUM_WINDOW = Knob("momentum_window", 32, "zo-sgd-mmt (seeded): the last K steps' seeds rebuild the momentum",
                       type=int, minimum=1)
LR_MMT = _rate("lr_zo_sgd_mmt", "zo-sgd-mmt lr", lambda c: (1 - c.option("momentum")) * c.option("lr_mezo"),
               "(1 - --momentum) x --lr-mezo; both momentum modes")
LR_ADAM = _rate("lr_zo_adam", "zo-adam lr", lambda c: GRAD_SCALE * c.option("lr_mezo"),
                f"{GRAD_SCALE:g} x --lr-mezo (the gradient scale at the default start)")
BETAS = Knob("betas", (0.9, 0.999), "zo-adam: Adam's (beta1, beta2)",
             type=lambda s: tuple(float(x) for x in s.split(",")), metavar="B1,B2")
ADAM_WINDOW = Knob("adam_window", 32, "zo-adam-seeded: the last K steps' keys rebuild Adam's first moment (relative "
                   "truncation beta1^K)", type=int, minimum=1)
LR_LOZO = _rate("lr_lozo", "lozo lr", lambda c: c.option("lr_mezo") / c.option("lozo_rank"),
                "--lr-mezo / rank; lozo and lozo-m")
LOZO_RANK = Knob("lozo_rank", 2, "lozo, lozo-m: rank r of the U Vᵀ perturbation", type=int, minimum=1)
LOZO_NU = Knob("lozo_nu", 10, "lozo, lozo-m: steps a V is kept (lazy subspace sampling; 10 measured better than "
               "the paper's 50 here, docs/lozo.md)", type=int, minimum=1)
NOISE = Knob("noise", "gaussian", "the ZO directions' form: gaussian (z) or rademacher (signs ±1)", type=str,
              choices=NOISE_FORMS)
LR_FZOO = _rate("lr_fzoo", "fzoo lr", lambda c: GRAD_SCALE * c.option("lr_mezo"),
                f"{GRAD_SCALE:g} x --lr-mezo (its step is normalised by the losses' spread, like Sign's)")
FZOO_DIRECTIONS = Knob("fzoo_directions", 8, "fzoo: N one-sided directions per step (N + 1 queries per example; "
                       "the paper's 8)", type=int, minimum=2)
FZOO_NOISE = Knob("fzoo_noise", "rademacher", "fzoo: the directions' form (the paper's rademacher ±1, or gaussian)",
                  type=str, choices=NOISE_FORMS)
LAYER_FRACTION = Knob("layer_fraction", 0.5, "mezo-lezo: fraction of the trainable tensors each step perturbs and "
                      "updates (LeZO layer sampling, drawn from the step key)", minimum=0, strict=True, maximum=1)
LR_LEZO = _rate("lr_mezo_lezo", "mezo-lezo lr", lambda c: c.option("lr_mezo") / c.option("layer_fraction"),
                "--lr-mezo / --layer-fraction (MeZO's expected step and variance per coordinate)")
LR_FG = _rate("lr_forward_grad", "forward-grad lr", lambda c: c.option("lr_mezo"), "--lr-mezo")
FG_QUERY_COST = Knob("fg_query_cost", 2, "queries charged per example of one forward-grad jvp: 2 = MeZO's two "
                     "forward passes (equal queries = equal steps; a jvp costs 2-3 forwards of arithmetic), 1 = "
                     "ZO-Bench's count (one forward with jvp)", type=int, choices=(1, 2))
LR_HIZOO = _rate("lr_hizoo", "hizoo lr", lambda c: c.option("lr_mezo"),
                 "--lr-mezo (σ = h^(-1/2) starts at 1 and the default smoothing keeps it near 1: MeZO's step)")
HIZOO_SMOOTHING = Knob("hizoo_smoothing", 1e-8, "hizoo: smoothing a of the curvature h (a number in [0, 1), or one "
                       "of the authors' schedules, e.g. constant1e-8, their example; constant0 is MeZO)",
                       type=lambda s: s if s.startswith("constant") else float(s), metavar="A|SCHEDULE")
HIZOO_SIGMA_DTYPE = Knob("hizoo_sigma_dtype", "float32", "hizoo: storage of its state σ = h^(-1/2): float32, or "
                         "bfloat16 (half of HiZOO's extra memory; float32 arithmetic, σ rounded back stochastically)",
                         type=str, choices=("float32", "bfloat16"))
FO_EPOCHS = Knob("fo_epochs", 2.0, "first-order baselines: epochs over the training split", minimum=0, strict=True)
FO_BATCH_SIZE = Knob("fo_batch_size", 16, "first-order baselines' batch; 0: --batch-size", type=int, minimum=0)
LR_FO_SGD = Knob("lr_fo_sgd", 1e-2, "FO-SGD lr", minimum=0)
LR_FO_ADAM = Knob("lr_fo_adam", 1e-5, "FO-Adam lr", minimum=0)


# ----------------------------------------------------------------- makers
def _noise(cfg: TrainConfig, knob: str = "noise", default: str = "gaussian") -> dict:
    """The noise form of knob `knob`, passed only when it is not the class's own `default` (so a Gaussian
    run builds its optimizer exactly as before the knob existed)."""
    form = cfg.option(knob)
    return {} if form == default else {"noise": form}


def _make(cls_name: str, lr: Knob, options=None, noise_knob="noise", noise_default="gaussian", **fixed):
    """make_optimizer of a zo_kernels.optim class: lr from its knob, options(cfg) from other knobs,
    the noise form from `noise_knob` (None: the class has one form; `noise_default`: the class's),
    fixed options, and the run-wide ZO options."""
    def make(params, cfg: TrainConfig):
        optim = import_optim()
        extra = {} if options is None else options(cfg)
        if noise_knob is not None:
            extra.update(_noise(cfg, noise_knob, noise_default))
        return getattr(optim, cls_name)(params, lr=cfg.option(lr.name), eps=cfg.eps, weight_decay=cfg.weight_decay,
                                        seed=cfg.seed, **fixed, **extra, **zo_extra(cfg))
    return make


def _spsa(cfg: TrainConfig) -> dict:
    n = cfg.option("n_directions")
    return {} if n == 1 else {"n_directions": n}


def _mezo_options(cfg: TrainConfig) -> dict:
    return {"lookahead": cfg.option("lookahead"), **_spsa(cfg)}


def _svrg_options(cfg: TrainConfig) -> dict:
    return {"lr_full": cfg.option("lr_svrg_full"), "q": cfg.option("q"), "anchor": cfg.option("anchor")}


def _mmt_options(cfg: TrainConfig) -> dict:
    return {"momentum": cfg.option("momentum"), **_spsa(cfg)}


def _lozo_options(cfg: TrainConfig) -> dict:
    return {"rank": cfg.option("lozo_rank"), "nu": cfg.option("lozo_nu")}


def _make_forward_grad(params, cfg: TrainConfig, module: torch.nn.Module):
    """ForwardGrad trains the module's parameters that require grad: they must be `params`."""
    optim = import_optim()
    opt = optim.ForwardGrad(module, lr=cfg.option("lr_forward_grad"), weight_decay=cfg.weight_decay,
                            seed=cfg.seed, **_noise(cfg), **zo_extra(cfg))
    mine = {id(p) for g in opt.param_groups for p in g["params"]}
    if mine != {id(p) for p in params}:
        raise FinetuneError("forward-grad trains the model's parameters with requires_grad=True, which differ "
                            "from the trainable parameters chosen")
    return opt


def _two_point(opt, cfg: TrainConfig, large: int) -> int:
    return 2 * cfg.batch_size


def _queries_per_step(opt, cfg: TrainConfig, large: int) -> int:
    return opt.queries_per_step * cfg.batch_size


def _svrg_cost(opt, cfg: TrainConfig, large: int) -> int:
    return 2 * large if is_full_step(opt) else 4 * cfg.batch_size


# ------------------------------------------------------------------ entries
register(Method("mezo", "MeZO", "zo", _make("MeZO", LR_MEZO, _mezo_options), _queries_per_step, "tab:blue",
                knobs=(LR_MEZO, LOOKAHEAD, N_DIRECTIONS, NOISE), lr_knob="lr_mezo"))
register(Method("mezo-svrg", "MeZO-SVRG", "zo", _make("MeZOSVRG", LR_SVRG, _svrg_options), _svrg_cost, "tab:red",
                knobs=(LR_SVRG, LR_SVRG_FULL, Q, LARGE_BATCH, ANCHOR, NOISE), lr_knob="lr_svrg"))
register(Method("fo-sgd", "FO-SGD", "fo",
                lambda params, cfg: torch.optim.SGD(params, lr=cfg.option("lr_fo_sgd"), weight_decay=cfg.weight_decay),
                color="tab:green", knobs=(LR_FO_SGD, FO_EPOCHS, FO_BATCH_SIZE), lr_knob="lr_fo_sgd"))
register(Method("fo-adam", "FO-Adam", "fo",
                lambda params, cfg: torch.optim.Adam(params, lr=cfg.option("lr_fo_adam"), weight_decay=cfg.weight_decay),
                color="tab:purple", knobs=(LR_FO_ADAM, FO_EPOCHS, FO_BATCH_SIZE), lr_knob="lr_fo_adam"))
register(Method("n-spsa", "n-SPSA", "zo",
                _make("MeZO", LR_N_SPSA, lambda c: {"n_directions": c.option("q")}), _queries_per_step, "tab:cyan",
                knobs=(LR_N_SPSA, LR_MEZO, Q, NOISE), lr_knob="lr_n_spsa"))
register(Method("zo-sgd-sign", "ZO-SGD-Sign", "zo", _make("ZOSGDSign", LR_SIGN, _spsa), _queries_per_step,
                "tab:olive", knobs=(LR_SIGN, LR_MEZO, N_DIRECTIONS, NOISE), lr_knob="lr_zo_sgd_sign"))
register(Method("zo-sgd-cons", "ZO-SGD-Cons", "zo", _make("ZOSGDCons", LR_CONS, _spsa), _queries_per_step,
                "tab:brown", knobs=(LR_CONS, LR_MEZO, N_DIRECTIONS, NOISE), lr_knob="lr_zo_sgd_cons"))
register(Method("zo-sgd-mmt", "ZO-SGD-MMT (seeded)", "zo",
                _make("ZOSGDMomentum", LR_MMT, lambda c: {**_mmt_options(c), "window": c.option("momentum_window")},
                      state="seeded"), _queries_per_step, "tab:pink",
                knobs=(LR_MMT, LR_MEZO, MOMENTUM, MOMENTUM_WINDOW, N_DIRECTIONS, NOISE), lr_knob="lr_zo_sgd_mmt"))
register(Method("zo-sgd-mmt-dense", "ZO-SGD-MMT (dense)", "zo",
                _make("ZOSGDMomentum", LR_MMT, _mmt_options, state="dense"), _queries_per_step, "tab:gray",
                knobs=(LR_MMT, LR_MEZO, MOMENTUM, N_DIRECTIONS, NOISE), lr_knob="lr_zo_sgd_mmt"))
register(Method("zo-adam", "ZO-Adam", "zo",
                _make("ZOAdam", LR_ADAM, lambda c: {"betas": tuple(c.option("betas")), **_spsa(c)}),
                _queries_per_step, "tab:orange", knobs=(LR_ADAM, LR_MEZO, BETAS, N_DIRECTIONS, NOISE), lr_knob="lr_zo_adam"))
# ZO-Adam with no weight-sized state: ±1 noise (v one scalar per group), m rebuilt from the last K keys; AdamW's
# decoupled weight decay (the coupled L2 term is not a sum of seeds).
register(Method("zo-adam-seeded", "ZO-Adam (seeded)", "zo",
                _make("ZOAdam", LR_ADAM, lambda c: {"betas": tuple(c.option("betas")), "window": c.option("adam_window")},
                      noise_knob=None, state="seeded", noise="rademacher", decoupled=True),
                _queries_per_step, "goldenrod", knobs=(LR_ADAM, LR_MEZO, BETAS, ADAM_WINDOW), lr_knob="lr_zo_adam"))
# LOZO / LOZO-M (low-rank perturbations U Vᵀ, rank --lozo-rank, V kept --lozo-nu steps)
register(Method("lozo", "LOZO", "zo", _make("LOZO", LR_LOZO, _lozo_options, noise_knob=None), _two_point, "teal",
                knobs=(LR_LOZO, LR_MEZO, LOZO_RANK, LOZO_NU), lr_knob="lr_lozo"))
register(Method("lozo-m", "LOZO-M", "zo",
                _make("LOZOM", LR_LOZO, lambda c: {**_lozo_options(c), "beta": c.option("momentum")}, noise_knob=None), _two_point,
                "darkgoldenrod", knobs=(LR_LOZO, LR_MEZO, LOZO_RANK, LOZO_NU, MOMENTUM), lr_knob="lr_lozo"))
# Forward gradient (exact ∇f·z by a jvp, charged fg_query_cost queries per example: module docstring).
register(Method("forward-grad", "Forward-Grad", "zo", _make_forward_grad,
                lambda opt, cfg, large: cfg.option("fg_query_cost") * cfg.batch_size, "black",
                needs_module=True, differentiates=True, query_cost=lambda cfg: cfg.option("fg_query_cost"),
                knobs=(LR_FG, LR_MEZO, FG_QUERY_COST, NOISE), lr_knob="lr_forward_grad"))
# FZOO (N one-sided ±1 directions and a clean forward per step, normalised by the losses' spread) and
# MeZO with LeZO's layer sampling (a fraction of the tensors per step): docs/fzoo.md.
register(Method("fzoo", "FZOO", "zo",
                _make("FZOO", LR_FZOO, lambda c: {"n_directions": c.option("fzoo_directions")}, noise_knob="fzoo_noise",
                      noise_default="rademacher"),
                _queries_per_step, "crimson", knobs=(LR_FZOO, LR_MEZO, FZOO_DIRECTIONS, FZOO_NOISE), lr_knob="lr_fzoo"))
# HiZOO: a diagonal curvature h shapes the perturbation μ·z/√h (the scaled primitive); 3 forwards per step.
register(Method("hizoo", "HiZOO", "zo",
                _make("HiZOO", LR_HIZOO, lambda c: {"smoothing": c.option("hizoo_smoothing"),
                                                    "sigma_dtype": c.option("hizoo_sigma_dtype")}),
                _queries_per_step, "darkgreen", knobs=(LR_HIZOO, LR_MEZO, HIZOO_SMOOTHING, HIZOO_SIGMA_DTYPE, NOISE),
                lr_knob="lr_hizoo"))
register(Method("mezo-lezo", "MeZO (LeZO sampling)", "zo",
                _make("MeZO", LR_LEZO, lambda c: {"layer_fraction": c.option("layer_fraction"), **_spsa(c)}),
                _queries_per_step, "slateblue", knobs=(LR_LEZO, LR_MEZO, LAYER_FRACTION, N_DIRECTIONS, NOISE),
                lr_knob="lr_mezo_lezo"))
