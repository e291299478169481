"""zo-finetune's registry has ZO-Bench's family and LOZO / LOZO-M: each name builds its optimizer, and its step cost is
the optimizer's own query count (so equal budgets stay equal)."""
import pytest
import torch

from zo_kernels import optim
from zo_kernels.finetune.config import TrainConfig
from zo_kernels.finetune.registry import METHODS

from test_finetune_cli import _base, tiny  # noqa: F401  (the tiny model + data fixture)

NEW = {"n-spsa": optim.MeZO, "zo-sgd-sign": optim.ZOSGDSign, "zo-sgd-cons": optim.ZOSGDCons,
       "zo-sgd-mmt": optim.ZOSGDMomentum, "zo-sgd-mmt-dense": optim.ZOSGDMomentum, "zo-adam": optim.ZOAdam,
       "lozo": optim.LOZO, "lozo-m": optim.LOZOM}


@pytest.mark.parametrize("name", sorted(NEW))
def test_registered_with_its_query_cost(name):
    cfg = TrainConfig(batch_size=8, options={"q": 3})
    m = METHODS[name]
    assert m.kind == "zo"
    net = torch.nn.Linear(4, 2)
    opt = m.make_optimizer(list(net.parameters()), cfg)
    assert type(opt) is NEW[name]
    calls = [0]

    def closure():
        calls[0] += 1
        return net(torch.ones(8, 4)).pow(2).mean()

    opt.step(closure)
    assert m.step_cost(opt, cfg, 0) == calls[0] * cfg.batch_size
    if name == "n-spsa":
        assert calls[0] == 2 * 3


# ---------------------------------------------------------------- forward gradient (torch.func.jvp)

def test_forward_grad_registered_with_its_query_cost():
    from zo_kernels.finetune.errors import FinetuneError

    m = METHODS["forward-grad"]
    assert m.kind == "zo" and m.needs_module and m.differentiates
    net = torch.nn.Linear(4, 2)
    for cost in (1, 2):
        cfg = TrainConfig(batch_size=8, options={"fg_query_cost": cost, "lr_forward_grad": 0.5})
        opt = m.build(net, list(net.parameters()), cfg)
        assert type(opt) is optim.ForwardGrad and opt.param_groups[0]["lr"] == 0.5
        assert m.step_cost(opt, cfg, 0) == cost * 8 and m.queries_per_example(cfg) == cost
    assert m.build(net, list(net.parameters()), TrainConfig(options={"lr_mezo": 3e-4})).param_groups[0]["lr"] == 3e-4
    with pytest.raises(FinetuneError, match="requires_grad"):
        m.build(net, [net.weight], TrainConfig())          # the bias requires grad too: not what was chosen


def _tiny_run_inputs(tiny):  # noqa: F811  (the fixture's value, passed on)
    from zo_kernels.finetune.data import load_text_classification
    from zo_kernels.finetune.heads import default_descriptions
    from zo_kernels.finetune.model import Encoded, load_model_and_tokenizer, select_trainable

    data = load_text_classification(tiny["csv"], n_train=32, n_val=16, n_test=16, seed=0)
    net, tok = load_model_and_tokenizer(tiny["model"], data.num_labels, head="description",
                                        descriptions=default_descriptions(data.label_names))
    enc = {k: Encoded(tok, getattr(data, k).texts, getattr(data, k).labels, 16, "cpu")
           for k in ("train", "val", "test")}
    return net, select_trainable(net, None), enc


def test_forward_grad_run_matches_hand_run(tiny):  # noqa: F811
    """MethodRun's forward-grad = ForwardGrad stepped by hand on the same batches (bit for bit); it is
    charged 2 queries per example (MeZO's steps at MeZO's budget), moves the weights, and differentiates
    cross-entropy under --objective accuracy (whose jvp would be 0: the weights would not move)."""
    from zo_kernels.finetune.evaluation import batch_loss
    from zo_kernels.finetune.training import MethodRun, Sampler

    cfg = TrainConfig(batch_size=4, queries=6 * 2 * 4, evals=1, seed=3, objective="accuracy",
                      options={"lr_forward_grad": 2e-2})
    net, trainable, enc = _tiny_run_inputs(tiny)
    w0 = [p.detach().clone() for p in trainable]
    res = MethodRun("forward-grad", net, trainable, enc, cfg, {"queries": 0, "test_acc": 0.5}, progress=False).run()
    assert res.steps == 6 and res.queries == 6 * 2 * 4          # MeZO's step count at the same budget
    assert any(not torch.equal(a, b) for a, b in zip(w0, trainable))

    ref, ref_params, _ = _tiny_run_inputs(tiny)               # the same start, stepped by hand
    assert all(torch.equal(a, b) for a, b in zip(w0, ref_params))
    opt = optim.ForwardGrad(ref, lr=2e-2, seed=3)
    sampler = Sampler(len(enc["train"]), 4, 3)
    for _ in range(6):
        batch = enc["train"].batch(sampler.next())
        with torch.no_grad():                                 # cross-entropy: --objective accuracy is ignored
            opt.step(lambda: batch_loss(ref, batch)[1])
    for a, b in zip(trainable, ref_params):
        assert torch.equal(a, b)


def test_forward_grad_cli_with_memory(tiny, tmp_path):  # noqa: F811
    import json

    from zo_kernels.finetune.cli import main

    out = tmp_path / "fg"
    rc = main(_base(tiny, out, "--methods", "mezo,forward-grad", "--steps", "3", "--evals", "1",
                    "--lr-forward-grad", "1e-2", "--memory-steps", "1", "--objective", "accuracy"))
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    fg, mezo = res["methods"]["forward-grad"], res["methods"]["mezo"]
    assert fg["steps"] == mezo["steps"] == 3 and fg["queries"] == mezo["queries"] == 3 * 2 * 4
    assert res["config"]["fg_query_cost"] == 2 and res["config"]["lr_forward_grad"] == 1e-2
    mem = res["memory"]["forward-grad"]
    assert "error" not in mem and mem["peak_rss_mb"] > 50 and mem["steps"] >= 1


# ------------------------------------------------------------- default learning rates, one flag each

def _rules():
    """Each method's default lr from MeZO's by its update rule (docs/zo_bench.md, restated here)."""
    from zo_kernels.finetune.methods import GRAD_SCALE

    o = TrainConfig.option
    return {"mezo": lambda c: o(c, "lr_mezo"), "mezo-svrg": lambda c: o(c, "lr_svrg"),
            "fo-sgd": lambda c: o(c, "lr_fo_sgd"), "fo-adam": lambda c: o(c, "lr_fo_adam"),
            "n-spsa": lambda c: o(c, "q") * o(c, "lr_mezo"),
            "zo-sgd-sign": lambda c: GRAD_SCALE * o(c, "lr_mezo"), "zo-sgd-cons": lambda c: o(c, "lr_mezo"),
            "zo-sgd-mmt": lambda c: 0.1 * o(c, "lr_mezo"), "zo-sgd-mmt-dense": lambda c: 0.1 * o(c, "lr_mezo"),
            "zo-adam": lambda c: GRAD_SCALE * o(c, "lr_mezo"), "lozo": lambda c: o(c, "lr_mezo") / o(c, "lozo_rank"),
            "lozo-m": lambda c: o(c, "lr_mezo") / o(c, "lozo_rank"), "forward-grad": lambda c: o(c, "lr_mezo"),
            "fzoo": lambda c: GRAD_SCALE * o(c, "lr_mezo"), "mezo-lezo": lambda c: o(c, "lr_mezo") / o(c, "layer_fraction"),
            "hizoo": lambda c: o(c, "lr_mezo"), "zo-adam-seeded": lambda c: GRAD_SCALE * o(c, "lr_mezo")}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_has_a_derived_default_lr_and_its_own_flag(name):
    """Defaults follow the documented rule (also when --lr-mezo changes); the method's --lr-* flag,
    parsed by the CLI, overrides it (and its twin's: both momentum modes, LOZO and LOZO-M) and
    leaves every other method on its rule (the seeded ZO-Adam shares ZO-Adam's flag)."""
    from zo_kernels.finetune.cli import build_parser

    assert name in _rules(), f"{name}: no default-lr rule documented"
    net = torch.nn.Linear(4, 2)
    for lr_mezo in (1e-4, 3e-3):
        cfg = TrainConfig(options={"lr_mezo": lr_mezo, "q": 3})
        opt = METHODS[name].build(net, list(net.parameters()), cfg)
        assert opt.param_groups[0]["lr"] == pytest.approx(_rules()[name](cfg), rel=1e-12)
    flag = {"mezo-svrg": "--lr-svrg", "zo-sgd-mmt-dense": "--lr-zo-sgd-mmt", "lozo-m": "--lr-lozo",
            "zo-adam-seeded": "--lr-zo-adam"}.get(name, f"--lr-{name}")
    a = build_parser().parse_args([flag, "0.0123"])
    cfg = TrainConfig.from_args(a, seed=0)
    assert METHODS[name].build(net, list(net.parameters()), cfg).param_groups[0]["lr"] == 0.0123
    pairs = {"zo-sgd-mmt": "zo-sgd-mmt-dense", "zo-sgd-mmt-dense": "zo-sgd-mmt", "lozo": "lozo-m", "lozo-m": "lozo",
             "zo-adam": "zo-adam-seeded", "zo-adam-seeded": "zo-adam"}
    for m in METHODS:                  # every other method keeps its rule (MeZO's lr is the others' base)
        want = 0.0123 if m in (name, pairs.get(name)) else _rules()[m](cfg)
        assert METHODS[m].build(net, list(net.parameters()), cfg).param_groups[0]["lr"] == pytest.approx(want), m


@pytest.mark.parametrize("name", ["lozo", "lozo-m"])
def test_lozo_rank_and_nu_flags_reach_the_optimizer(name):
    """--lozo-rank / --lozo-nu, parsed by the CLI, build LOZO / LOZO-M with that rank and period (and the
    derived lr follows the rank); the defaults are the tuned rank 2, ν 10 (docs/lozo.md)."""
    from zo_kernels.finetune.cli import build_parser

    net = torch.nn.Linear(4, 2)
    for argv, rank, nu in (([], 2, 10), (["--lozo-rank", "4", "--lozo-nu", "7"], 4, 7)):
        a = build_parser().parse_args(argv)
        cfg = TrainConfig.from_args(a, seed=0)
        opt = METHODS[name].build(net, list(net.parameters()), cfg)
        assert (opt.rank, opt.nu) == (rank, nu)
        assert opt.param_groups[0]["lr"] == pytest.approx(a.lr_mezo / rank, rel=1e-12)
