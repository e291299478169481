"""ZOTrainer (transformers.Trainer + MeZO / MeZO-SVRG) on a tiny BERT built from a config."""
import math
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments  # noqa: E402

from zo_kernels.integrations.hf import ZOArguments, ZOTrainer  # noqa: E402
from zo_kernels.noise import normal, step_key  # noqa: E402
from zo_kernels.optim import MeZO, MeZOSVRG  # noqa: E402

from optim_helpers import _one_thread  # noqa: E402,F401 (autouse)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=48, max_position_embeddings=16, num_labels=2)
    return BertForSequenceClassification(cfg)


def dataset(n, seed=0, length=8):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 50, (length,), generator=g),
             "attention_mask": torch.ones(length, dtype=torch.long), "labels": i % 2} for i in range(n)]


def targs(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4, learning_rate=1e-3,
                report_to=[], logging_steps=1, save_strategy="no", use_cpu=True, lr_scheduler_type="constant",
                disable_tqdm=True, seed=3)
    base.update(kw)
    return TrainingArguments(**base)


def test_mezo_step_matches_transcription(tmp_path):
    """One Trainer step on a 4-example set (one batch = the whole set) vs MeZO by hand."""
    model = tiny_bert()
    data = dataset(4)
    ref_model = tiny_bert()
    trainer = ZOTrainer(model=model, args=targs(tmp_path, max_steps=1, weight_decay=0.0), train_dataset=data,
                        zo_args=ZOArguments(eps=1e-3))
    trainer.train()
    opt = trainer.zo_optimizer
    assert isinstance(opt, MeZO) and opt.step_count == 1 and opt.seed == 3
    assert all(p.grad is None for p in model.parameters())
    # transcription: tensor ids follow the optimizer's flattened param groups
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in opt.param_groups for p in g["params"]]
    ref = dict(ref_model.named_parameters())
    theta0 = {n: ref[n].detach().clone() for n in order}
    k = step_key(3, 0)
    z = {n: normal(k, i, theta0[n].numel()).view_as(theta0[n]) for i, n in enumerate(order)}
    batch = {key: torch.stack([torch.as_tensor(d[key]) for d in data]) for key in data[0]}
    ref_model.eval()

    def loss_at(sign):
        with torch.no_grad():
            for n in order:
                ref[n].copy_(theta0[n] + sign * 1e-3 * z[n])
            return ref_model(**batch).loss.item()

    c = (loss_at(+1) - loss_at(-1)) / 2e-3
    want = {n: theta0[n] - 1e-3 * c * z[n] for n in order}
    got = dict(model.named_parameters())
    d_got = torch.cat([(got[n].detach() - theta0[n]).flatten() for n in order])
    d_want = torch.cat([(want[n] - theta0[n]).flatten() for n in order])
    assert d_want.norm() > 0
    assert ((d_got - d_want).norm() / d_want.norm()).item() < 1e-3


def test_svrg_trainer_runs_full_and_minibatch_steps(tmp_path):
    model = tiny_bert()
    data = dataset(16)
    trainer = ZOTrainer(model=model, args=targs(tmp_path, max_steps=5), train_dataset=data,
                        eval_dataset=dataset(8, seed=1),
                        zo_args=ZOArguments(optimizer="mezo-svrg", q=2, full_batch_size=8, lr_full=2e-3,
                                            anchor="replay"))
    before = [p.detach().clone() for p in model.parameters()]
    out = trainer.train()
    opt = trainer.zo_optimizer
    assert isinstance(opt, MeZOSVRG) and opt.step_count == 5 and opt.anchor == "replay"
    assert opt.param_groups[0]["lr_full"] == 2e-3
    assert math.isfinite(out.training_loss)
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), before))
    assert all(p.grad is None for p in model.parameters())
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 5 and all(math.isfinite(float(x)) for x in logged)
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"])


def test_lookahead_is_settled_for_eval_and_save(tmp_path):
    model = tiny_bert()
    trainer = ZOTrainer(model=model, args=targs(tmp_path, max_steps=3), train_dataset=dataset(8),
                        eval_dataset=dataset(4, seed=2), zo_args=ZOArguments(lookahead=True))
    trainer.train()
    opt = trainer.zo_optimizer
    assert opt.lookahead and not opt.is_perturbed       # train() settles at the end
    # perturb by hand through one more step, then evaluation must settle first
    opt.step(lambda: model(**{k: torch.stack([torch.as_tensor(d[k]) for d in dataset(4)])
                              for k in ("input_ids", "attention_mask", "labels")}).loss)
    assert opt.is_perturbed
    trainer.evaluate()
    assert not opt.is_perturbed
    opt.step(lambda: torch.tensor(0.5))
    trainer.save_model(str(tmp_path / "final"))
    assert not opt.is_perturbed
    reloaded = BertForSequenceClassification.from_pretrained(str(tmp_path / "final"))
    for (n, a), (_, b) in zip(model.named_parameters(), reloaded.named_parameters()):
        assert torch.equal(a, b), n


def test_gradient_accumulation_is_one_zo_step_over_the_micro_batches(tmp_path):
    """gradient_accumulation_steps=2 with batches of 2 = one ZO step on the mean loss of both: the same
    trajectory as batches of 4 (the sampler's order is the same; the mean of two equal-size micro-batch
    means is the batch mean, up to float rounding of the losses)."""
    runs = {}
    for ga, bs in ((1, 4), (2, 2)):
        model = tiny_bert()
        trainer = ZOTrainer(model=model, args=targs(tmp_path / str(ga), per_device_train_batch_size=bs, max_steps=3,
                                                    gradient_accumulation_steps=ga, weight_decay=0.0),
                            train_dataset=dataset(12), zo_args=ZOArguments(eps=1e-2))
        trainer.train()
        assert trainer.zo_optimizer.step_count == 3
        runs[ga] = [p.detach().clone() for p in model.parameters()]
    a = torch.cat([p.flatten() for p in runs[1]])
    b = torch.cat([p.flatten() for p in runs[2]])
    moved = (a - torch.cat([p.detach().flatten() for p in tiny_bert().parameters()])).norm()
    assert moved > 0 and (a - b).norm() <= 1e-3 * moved


@pytest.mark.parametrize("name", ["zo-sgd-sign", "zo-sgd-cons", "zo-sgd-mmt", "zo-adam"])
def test_zo_bench_methods_train(tmp_path, name):
    model = tiny_bert()
    w0 = [p.detach().clone() for p in model.parameters()]
    trainer = ZOTrainer(model=model, args=targs(tmp_path, max_steps=2), train_dataset=dataset(8),
                        zo_args=ZOArguments(optimizer=name, n_directions=2))
    trainer.train()
    assert trainer.zo_optimizer.step_count == 2
    assert not all(torch.equal(a, b) for a, b in zip(w0, model.parameters()))


def test_wrong_optimizer_kind_rejected():
    with pytest.raises(ValueError, match="optimizer"):
        ZOArguments(optimizer="adam")
    with pytest.raises(ValueError, match="lookahead"):
        ZOArguments(optimizer="mezo-svrg", lookahead=True)


@pytest.mark.parametrize("optimizer", ["mezo", "mezo-svrg"])
def test_step_hooks_fire_once_per_training_step(tmp_path, optimizer):
    """The Trainer calls optimizer.step() after ZOTrainer's training_step already stepped: that call
    used to fire the step hooks a second time."""
    trainer = ZOTrainer(model=tiny_bert(), args=targs(tmp_path, max_steps=3), train_dataset=dataset(8),
                        zo_args=ZOArguments(optimizer=optimizer, full_batch_size=4))
    trainer.create_optimizer()
    opt = trainer.zo_optimizer
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append(("pre", o.step_count)))
    opt.register_step_post_hook(lambda o, a, k: seen.append(("post", o.step_count)))
    trainer.train()
    assert opt.step_count == 3
    assert seen == [("pre", 0), ("post", 1), ("pre", 1), ("post", 2), ("pre", 2), ("post", 3)]


def test_subclass_step_calling_super_fires_hooks_once():
    class Counting(MeZO):
        def step(self, closure=None):
            return super().step(closure)

    p = torch.nn.Parameter(torch.randn(4))
    opt = Counting([p], lr=1e-3)
    n = []
    opt.register_step_post_hook(lambda o, a, k: n.append(1))
    opt.step(lambda: (p.double() ** 2).sum())
    assert len(n) == 1 and opt.step_count == 1


@pytest.mark.parametrize("anchor", ["dense", "replay"])
def test_svrg_resume_with_large_batch_sample_is_bit_identical(tmp_path, anchor):
    """full_batch_size < the train set: the large-batch sample of a full step must not depend on how
    many full steps this process ran (it used to: the counter was not in the checkpoint)."""
    zo = ZOArguments(optimizer="mezo-svrg", q=2, full_batch_size=4, lr_full=2e-3, anchor=anchor)
    data = dataset(16)

    def trainer(out, model, **kw):
        return ZOTrainer(model=model, args=targs(out, max_steps=6, save_strategy="steps", save_steps=3, **kw),
                         train_dataset=data, zo_args=zo)

    full = tiny_bert()
    trainer(tmp_path / "a", full).train()
    resumed = tiny_bert()
    trainer(tmp_path / "b", tiny_bert()).train()            # writes checkpoint-3 (and -6)
    trainer(tmp_path / "b", resumed).train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-3"))
    for (n, a), b in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), n


def test_zo_arguments_come_from_the_registry():
    """Every knob of the Trainer's methods is a ZOArguments field (MeZO-SVRG's full-step rate under its
    Trainer name lr_full), the method's own rate is the Trainer's learning_rate (no field), and a knob
    of another method is refused by name."""
    import dataclasses

    from zo_kernels.finetune.registry import METHODS
    from zo_kernels.integrations.hf import OPTIMIZERS

    fields = {f.name for f in dataclasses.fields(ZOArguments)}
    assert {"lr_full", "q", "anchor", "lookahead", "n_directions", "lozo_rank", "lozo_nu", "momentum"} <= fields
    assert not fields & {METHODS[m].lr_knob for m in OPTIMIZERS}
    assert {"mezo", "mezo-svrg", "lozo", "lozo-m", "zo-adam"} <= set(OPTIMIZERS)
    assert "forward-grad" not in OPTIMIZERS and "fo-sgd" not in OPTIMIZERS
    with pytest.raises(ValueError, match="lozo_rank is not an option of mezo"):
        ZOArguments(optimizer="mezo", lozo_rank=4)


def test_lozo_through_the_trainer(tmp_path):
    """A registry method the Trainer never named (LOZO) trains with its knobs from ZOArguments."""
    from zo_kernels.optim import LOZO

    model = tiny_bert()
    w0 = [p.detach().clone() for p in model.parameters()]
    trainer = ZOTrainer(model=model, args=targs(tmp_path, max_steps=2), train_dataset=dataset(8),
                        zo_args=ZOArguments(optimizer="lozo", lozo_rank=3, lozo_nu=5))
    trainer.train()
    opt = trainer.zo_optimizer
    assert isinstance(opt, LOZO) and (opt.rank, opt.nu) == (3, 5) and opt.step_count == 2
    assert not all(torch.equal(a, b) for a, b in zip(w0, model.parameters()))


def _is_fzoo(opt):
    from zo_kernels.optim import FZOO
    return isinstance(opt, FZOO) and opt.n_directions == 3 and opt.noise == "rademacher"


def _is_lezo(opt):
    return isinstance(opt, MeZO) and opt.layer_fraction == 0.5 and opt.noise == "rademacher"


def _is_hizoo(opt):
    from zo_kernels.optim import HiZOO
    return (isinstance(opt, HiZOO) and opt.smoothing == "constant1e-2"
            and all(st["sigma"].dtype == torch.bfloat16 for st in opt.state.values())
            and any(not torch.equal(st["sigma"], torch.ones_like(st["sigma"])) for st in opt.state.values()))


def _is_seeded_adam(opt):
    from zo_kernels.optim import ZOAdam
    return (isinstance(opt, ZOAdam) and opt.state_mode == "seeded" and opt.window == 4
            and opt.noise == "rademacher" and not any(opt.state.values()))


@pytest.mark.parametrize("optimizer, knobs, built_right", [
    ("fzoo", dict(fzoo_directions=3), _is_fzoo),
    ("mezo-lezo", dict(layer_fraction=0.5, noise="rademacher"), _is_lezo),
    ("hizoo", dict(hizoo_smoothing="constant1e-2", hizoo_sigma_dtype="bfloat16"), _is_hizoo),
    ("zo-adam-seeded", dict(adam_window=4), _is_seeded_adam)])
def test_newer_estimators_through_the_trainer(tmp_path, optimizer, knobs, built_right):
    """FZOO (its N and ±1 default), layer-sampled MeZO, HiZOO (its smoothing, bfloat16 σ) and the stateless ZO-Adam
    train through ZOTrainer via the registry, each built with the knobs given in ZOArguments."""
    model = tiny_bert()
    w0 = [p.detach().clone() for p in model.parameters()]
    trainer = ZOTrainer(model=model, args=targs(tmp_path, max_steps=2), train_dataset=dataset(8),
                        zo_args=ZOArguments(optimizer=optimizer, backend="reference", **knobs))
    trainer.train()
    assert trainer.zo_optimizer.step_count == 2 and built_right(trainer.zo_optimizer)
    assert not all(torch.equal(a, b) for a, b in zip(w0, model.parameters()))
