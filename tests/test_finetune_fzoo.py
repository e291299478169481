"""zo-finetune's fzoo and mezo-lezo entries and the shared --noise knob: each builds its optimizer with the
documented defaults and derived rates, --noise reaches every method that takes it (and only is passed
when not Gaussian), the step cost is the optimizer's queries, bad values are refused before loading."""
import pytest
import torch

from zo_kernels.finetune.cli import _check_numbers, build_parser
from zo_kernels.finetune.config import TrainConfig
from zo_kernels.finetune.errors import FinetuneError
from zo_kernels.finetune.methods import GRAD_SCALE
from zo_kernels.finetune.registry import METHODS, knob_users
from zo_kernels.optim import FZOO, MeZO

from optim_helpers import _one_thread  # noqa: F401 (autouse)


def _net():
    torch.manual_seed(0)
    return torch.nn.Linear(6, 3)


def _build(name, **options):
    net = _net()
    cfg = TrainConfig(batch_size=8, options=options)
    return METHODS[name].build(net, list(net.parameters()), cfg), cfg


def test_fzoo_defaults_are_the_papers():
    opt, cfg = _build("fzoo", lr_mezo=2e-4)
    assert isinstance(opt, FZOO) and opt.n_directions == 8 and opt.noise == "rademacher"
    assert opt.param_groups[0]["lr"] == pytest.approx(GRAD_SCALE * 2e-4, rel=1e-12)
    assert METHODS["fzoo"].step_cost(opt, cfg, 0) == 9 * 8
    opt, _ = _build("fzoo", fzoo_directions=4, fzoo_noise="gaussian", lr_fzoo=1e-3)
    assert (opt.n_directions, opt.noise, opt.param_groups[0]["lr"]) == (4, "gaussian", 1e-3)


def test_mezo_lezo_defaults():
    opt, cfg = _build("mezo-lezo", lr_mezo=2e-4)
    assert isinstance(opt, MeZO) and opt.layer_fraction == 0.5 and not opt.lookahead
    assert opt.param_groups[0]["lr"] == pytest.approx(2e-4 / 0.5, rel=1e-12)
    assert METHODS["mezo-lezo"].step_cost(opt, cfg, 0) == 2 * 8
    opt, _ = _build("mezo-lezo", lr_mezo=2e-4, layer_fraction=0.25)
    assert opt.layer_fraction == 0.25 and opt.param_groups[0]["lr"] == pytest.approx(8e-4, rel=1e-12)


def test_noise_knob_reaches_every_method_that_takes_it():
    users = knob_users("noise")
    assert {"mezo", "mezo-svrg", "n-spsa", "zo-sgd-sign", "zo-sgd-cons", "zo-sgd-mmt", "zo-adam",
            "mezo-lezo"} <= set(users)
    assert not {"lozo", "lozo-m", "fzoo"} & set(users)
    for name in users:
        if METHODS[name].needs_module:
            continue
        assert _build(name, noise="rademacher")[0].noise == "rademacher", name
        assert _build(name)[0].noise == "gaussian", name


def test_gaussian_default_passes_no_noise_keyword(monkeypatch):
    """A Gaussian run builds its optimizer exactly as before the knob existed: no noise= argument."""
    seen = {}
    real = MeZO.__init__

    def spy(self, *a, **kw):
        seen.update(kw)
        real(self, *a, **kw)

    monkeypatch.setattr(MeZO, "__init__", spy)
    _build("mezo")
    assert "noise" not in seen
    _build("mezo", noise="rademacher")
    assert seen["noise"] == "rademacher"


@pytest.mark.parametrize("argv, what", [
    (["--layer-fraction", "1.5"], "--layer-fraction must be <= 1"),
    (["--layer-fraction", "0"], "--layer-fraction must be > 0"),
    (["--fzoo-directions", "1"], "--fzoo-directions must be >= 2"),
])
def test_bad_values_refused_before_loading(argv, what):
    with pytest.raises(FinetuneError, match=what):
        _check_numbers(build_parser().parse_args(argv))


def test_noise_choices():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--noise", "uniform"])
