"""zo-finetune's hizoo and zo-adam-seeded entries: each builds its optimizer with the documented defaults and
derived rates, its knobs reach it (a schedule name or a number for --hizoo-smoothing, --hizoo-sigma-dtype
from the command line to σ's dtype), the step cost is the optimizer's queries, and the seeded
Adam keeps no tensor state."""
import pytest
import torch

from zo_kernels.finetune.cli import build_parser
from zo_kernels.finetune.config import TrainConfig
from zo_kernels.finetune.methods import GRAD_SCALE
from zo_kernels.finetune.registry import METHODS
from zo_kernels.optim import HiZOO, ZOAdam

from optim_helpers import _one_thread  # noqa: F401 (autouse)


def _build(name, **options):
    torch.manual_seed(0)
    net = torch.nn.Linear(6, 3)
    cfg = TrainConfig(batch_size=8, options=options)
    return METHODS[name].build(net, list(net.parameters()), cfg), cfg


def test_hizoo_defaults_and_knobs():
    opt, cfg = _build("hizoo", lr_mezo=2e-4)
    assert isinstance(opt, HiZOO) and opt.smoothing == 1e-8 and opt.noise == "gaussian"
    assert opt.sigma_dtype == torch.float32
    assert opt.param_groups[0]["lr"] == pytest.approx(2e-4, rel=1e-12)
    assert METHODS["hizoo"].step_cost(opt, cfg, 0) == 3 * 8
    opt, _ = _build("hizoo", hizoo_smoothing="constant_decay1", lr_hizoo=1e-3, noise="rademacher")
    assert (opt.smoothing, opt.param_groups[0]["lr"], opt.noise) == ("constant_decay1", 1e-3, "rademacher")


@pytest.mark.parametrize("arg, want", [("constant1e-8", "constant1e-8"), ("0.01", 0.01)])
def test_hizoo_smoothing_flag(arg, want):
    assert build_parser().parse_args(["--hizoo-smoothing", arg]).hizoo_smoothing == want


def test_hizoo_sigma_dtype_flag_reaches_the_optimizer():
    """--hizoo-sigma-dtype bfloat16 through the parsed arguments (what results.json's config records: the
    Experiment writes vars(args)) and TrainConfig.from_args to the optimizer, whose σ is then bfloat16."""
    args = build_parser().parse_args(["--hizoo-sigma-dtype", "bfloat16"])
    assert vars(args)["hizoo_sigma_dtype"] == "bfloat16"
    assert build_parser().parse_args([]).hizoo_sigma_dtype == "float32"
    torch.manual_seed(0)
    net = torch.nn.Linear(6, 3)
    opt = METHODS["hizoo"].build(net, list(net.parameters()), TrainConfig.from_args(args, seed=0))
    assert opt.sigma_dtype == torch.bfloat16
    x = torch.randn(4, 6)
    opt.step(lambda: net(x).square().mean())
    assert [opt.state[p]["sigma"].dtype for p in net.parameters()] == [torch.bfloat16] * 2
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--hizoo-sigma-dtype", "float16"])


def test_zo_adam_seeded_defaults():
    opt, cfg = _build("zo-adam-seeded", lr_mezo=2e-4)
    assert isinstance(opt, ZOAdam) and opt.state_mode == "seeded" and opt.window == 32
    assert opt.noise == "rademacher" and opt.decoupled
    assert opt.param_groups[0]["lr"] == pytest.approx(GRAD_SCALE * 2e-4, rel=1e-12)
    assert METHODS["zo-adam-seeded"].step_cost(opt, cfg, 0) == 2 * 8
    assert _build("zo-adam-seeded", adam_window=5)[0].window == 5
