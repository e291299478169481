"""Classification heads for zo-finetune.

"description" (the default): a prompted, zero-shot start.  The encoder's tokens are mean-pooled
(masked), as sentence-transformers models such as all-MiniLM-L6-v2 are trained to be used, and

    logits_c = cos(pool(x), w_c) / T

where w_c starts as the pooled embedding of a label description ("This is a negative review.").
So the untrained model already classifies by similarity to the descriptions; fine-tuning moves
the encoder and the w_c.  This is the MeZO paper's point: ZO works when the task is posed close
to pre-training.  T (the temperature) sets how sharp the softmax is.

"fresh": AutoModelForSequenceClassification's own head (CLS pooler + a random linear layer), the
MeZO-SVRG paper's non-prompted setting; it starts at chance.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

HEADS = ("description", "fresh")
DEFAULT_TEMPERATURE = 0.05

# Label descriptions for the packaged Rotten Tomatoes labels (rotten = 0, fresh = 1).
SENTIMENT_DESCRIPTIONS = {"rotten": "This is a negative review.", "fresh": "This is a positive review.",
                          "negative": "This is a negative review.", "positive": "This is a positive review.",
                          "neg": "This is a negative review.", "pos": "This is a positive review.",
                          "0": "This is a negative review.", "1": "This is a positive review."}


def default_descriptions(label_names: Sequence[str]) -> List[str]:
    """Sentiment descriptions when every label is a known sentiment name, else "This is <label>."."""
    names = [str(x).strip().lower() for x in label_names]
    if all(n in SENTIMENT_DESCRIPTIONS for n in names) and len({SENTIMENT_DESCRIPTIONS[n] for n in names}) == len(names):
        return [SENTIMENT_DESCRIPTIONS[n] for n in names]
    return [f"This is {x}." for x in label_names]


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token states over the attention mask (padding excluded), accumulated in fp32."""
    m = mask.unsqueeze(-1).to(torch.float32)
    return (hidden.float() * m).sum(1) / m.sum(1).clamp_min(1.0)


class _Output:
    """What batch_loss reads from a model: `.logits` (like transformers' ModelOutput)."""

    def __init__(self, logits):
        self.logits = logits


class DescriptionClassifier(torch.nn.Module):
    """encoder -> masked mean pool -> cosine similarity to the label vectors / temperature."""

    def __init__(self, encoder: torch.nn.Module, label_vectors: torch.Tensor, temperature: float):
        super().__init__()
        self.encoder = encoder
        self.config = encoder.config
        n, h = label_vectors.shape
        # `classifier` (not "*embed*"): --partial keeps everything but embeddings and early blocks trainable
        self.classifier = torch.nn.Linear(h, n, bias=False)
        with torch.no_grad():
            self.classifier.weight.copy_(label_vectors.to(self.classifier.weight.dtype))
        self.temperature = float(temperature)

    def pooled(self, input_ids, attention_mask):
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return mean_pool(h, attention_mask)

    def forward(self, input_ids, attention_mask, token_type_ids: Optional[torch.Tensor] = None, **_):
        e = F.normalize(self.pooled(input_ids, attention_mask), dim=-1)
        w = F.normalize(self.classifier.weight.float(), dim=-1)
        return _Output(e @ w.t() / self.temperature)


def build_description_classifier(encoder, tok, descriptions: Sequence[str], temperature: float,
                                 device: str) -> DescriptionClassifier:
    """Pool each description through the (untrained) encoder: those vectors initialise the head."""
    enc = tok(list(descriptions), padding=True, return_tensors="pt")
    enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        h = encoder(**enc).last_hidden_state
        vec = mean_pool(h, enc["attention_mask"])
    return DescriptionClassifier(encoder, vec, temperature).to(device)
