"""zo-finetune --lr-schedule: the decay factors equal Hugging Face's schedulers (no warm-up), every
ZO step runs at base rate x factor(queries spent / budget), and --anneal with a schedule is refused."""
import json

import pytest

from test_finetune_cli import _base, tiny  # noqa: F401  (the tiny model + data fixture)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from zo_kernels.finetune.cli import main  # noqa: E402
from zo_kernels.finetune.schedules import lr_factor  # noqa: E402


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_factor_matches_transformers(schedule):
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    make = {"linear": get_linear_schedule_with_warmup, "cosine": get_cosine_schedule_with_warmup}[schedule]
    n = 37
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make(opt, num_warmup_steps=0, num_training_steps=n)
    for step in range(n + 1):
        assert lr_factor(schedule, step / n) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-12), step
        opt.step()
        sched.step()
    assert lr_factor("constant", 0.7) == 1.0


def test_zo_steps_follow_the_schedule(tiny, tmp_path):  # noqa: F811
    out = tmp_path / "lin"
    steps, batch = 6, 4
    assert main(_base(tiny, out, "--methods", "mezo,mezo-svrg", "--steps", str(steps), "--evals", "1",
                      "--no-memory", "--lr-schedule", "linear", "--q", "2", "--large-batch", "8")) == 0
    res = json.loads((out / "results.json").read_text())
    total = steps * 2 * batch
    mezo = res["methods"]["mezo"]
    # step k (1-based) starts after (k-1) MeZO steps of 2*batch queries
    assert [s for s, _ in mezo["lr_history"]] == list(range(1, steps + 1))
    for k, f in mezo["lr_history"]:
        assert f == pytest.approx(1 - (k - 1) * 2 * batch / total)
    # MeZO-SVRG: the factor follows the queries its own (uneven) steps have spent
    svrg = res["methods"]["mezo-svrg"]
    spent = [0] + [int(q) for q, _, _ in svrg["step_losses"]][:-1]
    assert [f for _, f in svrg["lr_history"]] == pytest.approx([1 - q / total for q in spent])
    assert svrg["lr_history"][-1][1] < 1.0


def test_anneal_and_schedule_refused(tiny, tmp_path, capsys):  # noqa: F811
    rc = main(_base(tiny, tmp_path / "o", "--methods", "mezo", "--steps", "2", "--no-memory", "--anneal",
                    "--lr-schedule", "cosine"))
    err = capsys.readouterr().err
    assert rc == 2 and "--anneal and --lr-schedule cosine" in err


def test_schedule_scales_every_rate_of_every_group():
    from zo_kernels.finetune.schedules import LRSchedule
    from zo_kernels.optim import MeZOSVRG

    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    opt = MeZOSVRG([{"params": [a]}, {"params": [b], "lr": 3e-3}], lr=1e-3, lr_full=4e-3, q=2)
    sched = LRSchedule(opt, "cosine", total=100)
    f = sched.apply(25)
    assert f == pytest.approx(lr_factor("cosine", 0.25))
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * f) and opt.param_groups[0]["lr_full"] == pytest.approx(4e-3 * f)
    assert opt.param_groups[1]["lr"] == pytest.approx(3e-3 * f) and opt.param_groups[1]["lr_full"] == pytest.approx(4e-3 * f)
    sched.apply(100)
    assert opt.param_groups[1]["lr"] == pytest.approx(0.0, abs=1e-18)
