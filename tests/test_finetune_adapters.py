"""zo-finetune's --peft wrapping (zo_kernels.finetune.adapters) on tiny models built from configs."""
import pytest
import torch

pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2ForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
)

from zo_kernels.finetune.adapters import PeftSpec, apply_peft, default_lora_targets  # noqa: E402
from zo_kernels.finetune.errors import FinetuneError  # noqa: E402
from zo_kernels.optim import MeZO  # noqa: E402

from optim_helpers import _one_thread  # noqa: E402,F401 (autouse)

BERT = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
            max_position_embeddings=16, num_labels=2)


def bert():
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(**BERT))


def llama():
    torch.manual_seed(0)
    return LlamaForSequenceClassification(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64,
                                                      num_hidden_layers=2, num_attention_heads=2,
                                                      num_key_value_heads=2, num_labels=2, pad_token_id=0))


def gpt2():
    torch.manual_seed(0)
    return GPT2ForSequenceClassification(GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=2, num_labels=2,
                                                    pad_token_id=0))


class PooledEncoder(torch.nn.Module):
    """The shape of zo-finetune's description head: an encoder and a `classifier` module."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = BertModel(BertConfig(**BERT))
        self.config = self.encoder.config
        self.classifier = torch.nn.Linear(32, 2, bias=False)

    def forward(self, input_ids, attention_mask, **_):
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.classifier(h.mean(1))


@pytest.mark.parametrize("make,targets", [(bert, ["query", "value"]), (llama, ["q_proj", "v_proj"]),
                                          (gpt2, ["c_attn"]), (PooledEncoder, ["query", "value"])])
def test_default_lora_targets_by_architecture(make, targets):
    assert default_lora_targets(make()) == targets


@pytest.mark.parametrize("make", [bert, llama, PooledEncoder])
def test_lora_trains_only_the_adapter_and_a_head_copy(make):
    net = make()
    total = sum(p.numel() for p in net.parameters())
    model = apply_peft(net, PeftSpec("lora", rank=4))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n or "modules_to_save" in n for n in names)
    assert any("modules_to_save" in n for n in names)            # the head stays trainable
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n_train < total // 5
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    ids = torch.randint(1, 50, (6, 5), generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 0, 1, 1, 0])

    def loss():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
        logits = out if torch.is_tensor(out) else out.logits
        return torch.nn.functional.cross_entropy(logits.float(), y)

    opt = MeZO([p for p in model.parameters() if p.requires_grad], lr=1e-2, seed=0)
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        for _ in range(3):
            opt.step(loss)
    after = [p for p in model.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(after, before))
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), n


@pytest.mark.parametrize("make", [bert, PooledEncoder])
def test_prefix_on_a_model_without_past_key_values_is_one_clear_error(make):
    with pytest.raises(FinetuneError, match="--peft prefix"):
        apply_peft(make(), PeftSpec("prefix"))


def test_bad_spec_is_a_clear_error():
    with pytest.raises(FinetuneError, match="unknown --peft"):
        PeftSpec("ia3")
    with pytest.raises(FinetuneError, match="--lora-alpha"):
        PeftSpec("lora", alpha=float("nan"))
    with pytest.raises(FinetuneError, match="--lora-targets"):
        apply_peft(torch.nn.Sequential(torch.nn.Linear(3, 3)), PeftSpec("lora"))
