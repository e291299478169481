"""A quantized base (zo_kernels.quant, zo-finetune --quantize): the scales are the tensors the layers
read (checked against a dequantization written out here), every ZO optimizer trains the QZO set and
LoRA over it with the integer codes bit-identical, a saved fine-tune reloads to the same predictions,
directional-derivative clipping, and the CLI end to end on a tiny model."""
import json
import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from zo_kernels import quant  # noqa: E402
from zo_kernels.finetune import files  # noqa: E402
from zo_kernels.finetune.cli import main  # noqa: E402
from zo_kernels.finetune.config import TrainConfig  # noqa: E402
from zo_kernels.finetune.quantize import load_trained, scale_trainable, trained_state  # noqa: E402
from zo_kernels.finetune.registry import METHODS, is_full_step  # noqa: E402
from zo_kernels.optim.base import clip_pair  # noqa: E402

from test_finetune_cli import _base, tiny  # noqa: E402,F401 (fixture)

KINDS = [pytest.param(k, marks=pytest.mark.skipif(not quant.available(k)[0], reason=quant.available(k)[1]))
         for k in quant.QUANT_KINDS]
ZO = [m for m, s in METHODS.items() if s.kind == "zo" and not s.differentiates]
# The normal-float-4 code book (QLoRA, Dettmers et al. 2023, appendix E), transcribed.
NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
       0.7229568362236023, 1.0]


def _tiny64_config(vocab_size):
    """nf4 needs rows that are whole 64-weight blocks: hidden 64 (test_finetune_cli's tiny model has 16)."""
    from transformers import BertConfig

    return BertConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=128, max_position_embeddings=32, num_labels=2)


_TINY64 = _tiny64_config(40)


@pytest.fixture(scope="module")
def tiny64(tiny):  # noqa: F811
    """test_finetune_cli's tokenizer and data with a hidden-64 random BERT."""
    import shutil

    from transformers import BertConfig, BertForSequenceClassification

    src = tiny["model"]
    model = src.rstrip("/") + "64"
    shutil.copytree(src, model, dirs_exist_ok=True)
    vocab = BertConfig.from_pretrained(src).vocab_size
    torch.manual_seed(0)
    BertForSequenceClassification(_tiny64_config(vocab)).save_pretrained(model)
    return {**tiny, "model": model}


def _tiny_bert(seed=0):
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(_TINY64).eval()


def _batch():
    g = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(0, 40, (6, 10), generator=g), "labels": torch.arange(6) % 2}


def _loss(net, b):
    return torch.nn.functional.cross_entropy(net(input_ids=b["input_ids"]).logits, b["labels"])


def _dequantized(layer, kind):
    """The layer's float weight from its codes and scales, written out from the formats' definitions."""
    if kind == "int8":
        return layer.weight.qdata.float() * layer.zo_scale          # symmetric per-row: w = q * s
    packed = layer.weight.data.reshape(-1)
    idx = torch.stack([packed >> 4, packed & 15], 1).reshape(-1).long()   # two codes a byte, high nibble first
    w = torch.tensor(NF4)[idx].reshape(-1, quant.NF4_BLOCK) * layer.zo_scale.reshape(-1, 1)
    return w.reshape(layer.out_features, layer.in_features)


@pytest.mark.parametrize("kind", KINDS)
def test_scales_are_what_the_layer_reads(kind):
    net = _tiny_bert()
    assert quant.quantize_(net, kind) == 12 + 1             # 6 per block and the pooler; the classifier stays float
    assert type(net.classifier) is torch.nn.Linear
    layer = net.bert.encoder.layer[0].attention.self.query
    x = torch.randn(3, 64)
    with torch.no_grad():
        for mu in (0.0, 1e-4, -1e-4):       # a no-grad eval forward first: where bitsandbytes would repack
            layer.zo_scale.add_(mu)
            y = layer(x)
            assert layer.zo_scale.dtype == torch.float32
            ref = x @ _dequantized(layer, kind).t() + layer.bias
            torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
            layer.zo_scale.sub_(mu)


@pytest.mark.parametrize("kind", KINDS)
def test_quantize_refuses_inference_mode_and_unknown_kinds(kind):
    with torch.inference_mode(), pytest.raises(quant.QuantError, match="inference_mode"):
        quant.quantize_(_tiny_bert(), kind)
    with pytest.raises(quant.QuantError, match="unknown quantization"):
        quant.quantize_(_tiny_bert(), "fp3")
    if kind == "nf4":
        with pytest.raises(quant.QuantError, match="not a multiple of 64"):
            quant.quantize_(torch.nn.Sequential(torch.nn.Linear(16, 64)), kind)


def _train(net, trainable, method, steps=3, lr=1e-3, eps=1e-3):
    cfg = TrainConfig(eps=eps, options={"lr_" + method.replace("-", "_"): lr, "lr_mezo": lr, "lr_svrg": lr,
                                        "lr_svrg_full": lr, "q": 2})
    opt = METHODS[method].build(net, trainable, cfg)
    b = _batch()
    for _ in range(steps):
        with torch.no_grad():
            if hasattr(opt, "is_full_step"):
                out = opt.step(lambda: _loss(net, b), full_closure=(lambda: _loss(net, b)) if is_full_step(opt) else None)
            else:
                out = opt.step(lambda: _loss(net, b))
        assert out is None or math.isfinite(float(out))
    if hasattr(opt, "settle"):
        opt.settle()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ZO)
def test_every_zo_optimizer_trains_scales_with_codes_untouched(kind, method):
    net = _tiny_bert()
    quant.quantize_(net, kind)
    codes = {k: v.clone() for k, v in quant.integer_codes(net).items()}
    trainable = scale_trainable(net)
    before = [p.detach().clone() for p in trainable]
    frozen = {n: p.detach().clone() for n, p in net.named_parameters() if "embeddings" in n and not p.requires_grad}
    _train(net, trainable, method)
    after = quant.integer_codes(net)
    assert all(torch.equal(codes[k], after[k]) for k in codes)
    assert sum(int((a != b).sum()) for a, b in zip(before, trainable)) > 0.5 * sum(p.numel() for p in trainable)
    assert len(frozen) == 3 and all(torch.equal(p, frozen[n]) for n, p in net.named_parameters() if n in frozen)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["mezo", "zo-adam", "lozo"])
def test_lora_over_a_quantized_base_leaves_codes_and_scales(kind, method):
    peft = pytest.importorskip("peft")
    net = _tiny_bert()
    quant.quantize_(net, kind)
    codes = {k: v.clone() for k, v in quant.integer_codes(net).items()}
    scales = [p.detach().clone() for _, p in quant.scale_parameters(net)]
    net = peft.get_peft_model(net, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"],
                                                   modules_to_save=["classifier"]))
    trainable = [p for p in net.parameters() if p.requires_grad]
    _train(net, trainable, method, lr=1e-2)
    after = list(quant.integer_codes(net).values())      # peft renamed the layers (…query.base_layer)
    assert len(after) == len(codes) and all(torch.equal(a, b) for a, b in zip(codes.values(), after))
    assert all(torch.equal(a, b) for a, (_, b) in zip(scales, quant.scale_parameters(net)))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("lora", [False, True])
def test_saved_finetune_reloads_to_the_same_predictions(kind, lora, tmp_path):
    def build():
        net = _tiny_bert()
        quant.quantize_(net, kind)
        if not lora:
            return net, scale_trainable(net)
        peft = pytest.importorskip("peft")
        net = peft.get_peft_model(net, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"],
                                                       modules_to_save=["classifier"]))
        return net, [p for p in net.parameters() if p.requires_grad]

    net, trainable = build()
    _train(net, trainable, "mezo", steps=4, lr=1e-2)
    path = tmp_path / "ft.pt"
    files.torch_save(str(path), trained_state(net))
    fresh, _ = build()
    ids = _batch()["input_ids"]
    with torch.no_grad():
        assert not torch.equal(fresh(input_ids=ids).logits, net(input_ids=ids).logits)   # training moved it
        load_trained(fresh, torch.load(str(path)))
        assert torch.equal(fresh(input_ids=ids).logits, net(input_ids=ids).logits)


def test_clip_pair_by_hand():
    assert clip_pair(3.0, 1.0, 2.0) == (3.0, 1.0)             # half-difference 1 <= 2: untouched
    assert clip_pair(5.0, 1.0, 0.5) == (3.5, 2.5)             # mean 3, half-difference 2 -> 0.5
    assert clip_pair(1.0, 5.0, 0.5) == (2.5, 3.5)


def test_clipped_mezo_step_is_the_step_at_the_clipped_derivative():
    """l(θ) = 100·Σθ: the directional derivative 100·Σz is clipped to ±c, so the update is −lr·c·sign·z."""
    from zo_kernels.optim import MeZO

    def run(clip):
        w = torch.zeros(256, requires_grad=True)     # the optimizers skip frozen tensors
        opt = MeZO([w], lr=1e-2, eps=1e-3, seed=3)
        opt.set_dd_clip(clip)
        zs = []

        def closure():
            zs.append(w.clone())
            return 100.0 * w.double().sum()
        with torch.no_grad():
            opt.step(closure)
        z = (zs[0] - zs[1]) / 2e-3
        return w.detach(), z

    w, z = run(None)
    d = 100.0 * float(z.double().sum())
    torch.testing.assert_close(w, -1e-2 * d * z, rtol=1e-4, atol=1e-6)
    w, z = run(0.5)
    torch.testing.assert_close(w, -1e-2 * math.copysign(0.5, d) * z, rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="> 0"):
        MeZO([torch.zeros(4, requires_grad=True)], lr=1e-2).set_dd_clip(0.0)


@pytest.mark.parametrize("kind,extra,tuning", [
    pytest.param("nf4", ["--train", "scales", "--clip-dd", "50", "--memory-steps", "1"], "QZO nf4 scales",
                 marks=KINDS[0].marks),
    # no memory processes here (each imports torchao again): the nf4 case covers them
    pytest.param("int8", ["--peft", "lora", "--lora-rank", "2", "--no-memory"], "LoRA r=2 over int8",
                 marks=KINDS[1].marks),
])
def test_cli_quantized_run(tiny64, tmp_path, capsys, kind, extra, tuning):
    out = tmp_path / "run"
    rc = main(_base(tiny64, out, "--quantize", kind, *extra, "--methods", "mezo,zo-adam", "--queries", "48",
                    "--evals", "1", "--lr-mezo", "1e-3", "--save-weights"))
    assert rc == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    q = res["model"]["quantization"]
    assert q["kind"] == kind and q["layers"] == 13 and res["model"]["tuning"] == tuning
    assert q["train"] == res["config"]["train"] and q["storage_bytes"]["codes"] > 0
    assert 0 < res["model"]["params_trainable"] < res["model"]["params_total"] // 4
    for m in ("mezo", "zo-adam"):
        assert res["methods"][m]["steps"] > 0
        assert "--no-memory" in extra or "error" not in res["memory"][m]
        saved = torch.load(str(out / "weights" / f"seed0_{m}.pt"))
        assert sum(t.numel() for t in saved.values()) == res["model"]["params_trainable"]


@pytest.mark.parametrize("extra,needle", [
    (["--train", "scales"], "--train scales trains quantization scales"),
    (["--quantize", "nf4"], "--peft lora"),
    (["--quantize", "nf4", "--train", "scales", "--methods", "fo-sgd"], "needs a derivative"),
    (["--quantize", "nf4", "--train", "scales", "--peft", "lora"], "drop --peft"),
    (["--quantize", "int8", "--peft", "lora", "--dtype", "bfloat16"], "float32"),
    (["--clip-dd", "0"], "--clip-dd must be > 0"),
    (["--clip-dd", "1", "--methods", "mezo,fo-adam"], "fo-adam computes no such estimate"),
])
def test_bad_quantize_input_is_one_line(tiny, tmp_path, capsys, extra, needle):  # noqa: F811
    rc = main(_base(tiny, tmp_path / "bad", *extra))
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and err.count("\n") == 1, err
