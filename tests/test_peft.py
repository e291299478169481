"""ZO optimizers on `peft` models (MeZO paper, claim 3: ZO works with parameter-efficient tuning).

LoRA on a tiny BERT classifier (MeZO, MeZO-SVRG, LOZO and ZO-Bench's family) and prefix tuning on a
tiny Llama causal LM, both built from configs
(random weights, nothing downloaded). For each: the trainable parameters are only the adapter's,
the loss on the training set falls, the frozen base weights stay bit-identical, and a state_dict
round trip (adapter weights + optimizer state) continues bit-identically.  Prefix tuning on BERT is
not tested: peft needs past key values for it, which BERT in transformers 5.x does not take.
"""
import copy
import os

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft import LoraConfig, PrefixTuningConfig, TaskType, get_peft_model  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM, TrainingArguments  # noqa: E402

from zo_kernels.integrations.hf import ZOArguments, ZOTrainer  # noqa: E402
from zo_kernels.optim import LOZO, MeZO, MeZOSVRG, ZOAdam, ZOSGDMomentum, ZOSGDSign  # noqa: E402

from optim_helpers import _one_thread  # noqa: E402,F401 (autouse)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 50


def lora_bert(seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=48, max_position_embeddings=16, num_labels=2)
    model = get_peft_model(BertForSequenceClassification(cfg),
                           LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8,
                                      target_modules=["query", "value"]))
    model.eval()
    return model


def prefix_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    model = get_peft_model(LlamaForCausalLM(cfg),
                           PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4))
    model.eval()
    return model


def _tokens(n=32, length=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, length), generator=g)


X = _tokens()
Y = (X[:, 0] < VOCAB // 2).long()          # a learnable label: is the first token in the lower half


def classifier_loss(model):
    return lambda: model(input_ids=X, attention_mask=torch.ones_like(X), labels=Y).loss


def lm_loss(model):
    return lambda: model(input_ids=X, labels=X).loss


CASES = {
    # name: (model factory, loss, optimizer factory, steps)
    "lora-mezo": (lora_bert, classifier_loss, lambda ps: MeZO(ps, lr=5e-2, eps=1e-3, seed=1), 40),
    "lora-mezo-lookahead": (lora_bert, classifier_loss,
                            lambda ps: MeZO(ps, lr=5e-2, eps=1e-3, seed=1, lookahead=True), 40),
    "lora-svrg-dense": (lora_bert, classifier_loss,
                        lambda ps: MeZOSVRG(ps, lr=5e-2, lr_full=5e-2, q=2, seed=1), 40),
    "lora-svrg-replay": (lora_bert, classifier_loss,
                         lambda ps: MeZOSVRG(ps, lr=5e-2, lr_full=5e-2, q=2, seed=1, anchor="replay"), 40),
    # LOZO and ZO-Bench's family on the same adapter (untuned rates that move the loss down here)
    "lora-lozo": (lora_bert, classifier_loss, lambda ps: LOZO(ps, lr=2.5e-2, eps=1e-3, rank=2, nu=10, seed=1), 40),
    "lora-n-spsa": (lora_bert, classifier_loss, lambda ps: MeZO(ps, lr=5e-2, eps=1e-3, seed=1, n_directions=2), 20),
    "lora-zo-sgd-sign": (lora_bert, classifier_loss, lambda ps: ZOSGDSign(ps, lr=1e-3, eps=1e-3, seed=1), 40),
    "lora-zo-sgd-mmt-seeded": (lora_bert, classifier_loss,
                               lambda ps: ZOSGDMomentum(ps, lr=5e-3, eps=1e-3, seed=1, momentum=0.9, state="seeded",
                                                        window=16), 40),
    "lora-zo-adam": (lora_bert, classifier_loss, lambda ps: ZOAdam(ps, lr=1e-3, eps=1e-3, seed=1), 40),
    "prefix-mezo": (prefix_llama, lm_loss, lambda ps: MeZO(ps, lr=1e-1, eps=1e-3, seed=1), 30),
    "prefix-svrg-replay": (prefix_llama, lm_loss,
                           lambda ps: MeZOSVRG(ps, lr=1e-1, lr_full=1e-1, q=2, seed=1, anchor="replay"), 30),
}


def _step(opt, loss):
    if isinstance(opt, MeZOSVRG):
        return opt.step(loss, full_closure=loss)
    return opt.step(loss)


def _eval_loss(model, opt, loss):
    if isinstance(opt, MeZO):
        opt.settle()                     # lookahead leaves the next perturbation applied
    return loss().item()


@pytest.mark.parametrize("case", list(CASES))
@torch.no_grad()
def test_peft_adapter_trains_and_base_is_untouched(case):
    make_model, make_loss, make_opt, steps = CASES[case]
    model = make_model()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in trainable]
    n_trainable = sum(p.numel() for p in trainable)
    assert 0 < n_trainable < sum(p.numel() for p in model.parameters()) // 10
    loss = make_loss(model)
    l0 = loss().item()
    opt = make_opt(trainable)
    for _ in range(steps):
        _step(opt, loss)
    l1 = _eval_loss(model, opt, loss)
    assert l1 < l0, f"{case}: loss {l0:.5f} -> {l1:.5f}"
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), f"{case}: frozen {n} changed"
    assert any(not torch.equal(p, s) for p, s in zip(trainable, start))


def _adapter_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("case", ["lora-mezo", "lora-mezo-lookahead", "lora-svrg-dense", "lora-svrg-replay",
                                  "lora-lozo", "lora-zo-sgd-mmt-seeded", "lora-zo-adam", "prefix-svrg-replay"])
@torch.no_grad()
def test_peft_state_dict_round_trip_is_bit_identical(case):
    """Run k steps, save (adapter weights, optimizer state), continue; a fresh model + optimizer that
    loads both continues to the same bits."""
    make_model, make_loss, make_opt, _ = CASES[case]
    model = make_model()
    opt = make_opt([p for p in model.parameters() if p.requires_grad])
    loss = make_loss(model)
    for _ in range(5):
        _step(opt, loss)
    saved_opt = copy.deepcopy(opt.state_dict())
    saved_weights = _adapter_state(model)
    for _ in range(6):
        _step(opt, loss)

    model2 = make_model()
    named2 = dict(model2.named_parameters())
    for t in named2.values():            # scramble the adapter: the load must overwrite it
        if t.requires_grad:
            t.normal_()
    for n, t in saved_weights.items():
        named2[n].copy_(t)
    opt2 = make_opt([p for p in model2.parameters() if p.requires_grad])
    opt2.load_state_dict(saved_opt)
    loss2 = make_loss(model2)
    for _ in range(6):
        _step(opt2, loss2)
    a, b = _adapter_state(model), _adapter_state(model2)
    for n in a:
        assert torch.equal(a[n], b[n]), f"{case}: {n} differs after resume"


def _trainer_data(n=4):
    return [{"input_ids": X[i], "attention_mask": torch.ones_like(X[i]), "labels": int(Y[i])} for i in range(n)]


@pytest.mark.parametrize("optimizer", ["mezo", "mezo-svrg"])
def test_zotrainer_with_a_lora_model(tmp_path, optimizer):
    """ZOTrainer trains only the adapter; a hand-run MeZO / MeZO-SVRG over the same parameter groups
    and the same (one-batch) data reaches the same weights."""
    model = lora_bert()
    ref = lora_bert()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    data = _trainer_data(4)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4,
                             learning_rate=5e-2, weight_decay=0.0, report_to=[], save_strategy="no",
                             use_cpu=True, lr_scheduler_type="constant", disable_tqdm=True, seed=3)
    svrg = {"lr_full": 5e-2, "q": 2} if optimizer == "mezo-svrg" else {}   # another method's knobs are refused
    zo = ZOArguments(optimizer=optimizer, eps=1e-3, **svrg)
    trainer = ZOTrainer(model=model, args=args, train_dataset=data, zo_args=zo)
    trainer.train()
    opt = trainer.zo_optimizer
    assert opt.step_count == 4
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), f"frozen {n} changed"
        else:
            assert p.grad is None

    # the same algorithm by hand: same groups (by name), same seed, the one batch as both losses
    names = {id(p): n for n, p in model.named_parameters()}
    ref_named = dict(ref.named_parameters())
    groups = [{"params": [ref_named[names[id(p)]] for p in g["params"]], "weight_decay": g["weight_decay"]}
              for g in opt.param_groups]
    batch = {k: torch.stack([torch.as_tensor(d[k]) for d in data]) for k in data[0]}
    loss = lambda: ref(**batch).loss  # noqa: E731
    if optimizer == "mezo":
        hand = MeZO(groups, lr=5e-2, eps=1e-3, seed=3)
    else:
        hand = MeZOSVRG(groups, lr=5e-2, lr_full=5e-2, q=2, eps=1e-3, seed=3)
    with torch.no_grad():
        for _ in range(4):
            _step(hand, loss)
    # fp32 losses of a reordered batch differ in the last bit and SPSA divides by 2μ: compare the
    # distance travelled, as tests/test_hf_trainer.py does
    start = {n: p.detach() for n, p in lora_bert().named_parameters() if p.requires_grad}
    d_got = torch.cat([(p.detach() - start[n]).flatten() for n, p in model.named_parameters() if p.requires_grad])
    d_want = torch.cat([(ref_named[n].detach() - start[n]).flatten() for n in start])
    assert d_want.norm() > 0
    assert ((d_got - d_want).norm() / d_want.norm()).item() < 1e-3
