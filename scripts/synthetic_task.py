"""A stand-in fine-tuning task for machines without the model and data packages (the lent GPU machine).

    python scripts/synthetic_task.py DIR [--shape tiny]   # -> DIR/model (config, weights, tokenizer), DIR/data.csv

The model is a BERT classifier of all-MiniLM-L6-v2's shape (6 layers, 384 wide, 12 heads, 1536 FFN,
30522-token embedding: 22.7M parameters) with random weights, so step times and the noise/forward
ratio are those of the default run; its WordPiece tokenizer knows only the task's words.  The data
are short sentences of filler words plus two sentiment words; the label is the sentiment.  Nothing
is downloaded: only transformers' classes and this file's word lists are used.
"""
from __future__ import annotations

import argparse
import os
import random

POS = ["good", "great", "fun", "moving", "funny", "smart", "warm", "brilliant", "charming", "fresh"]
NEG = ["bad", "dull", "boring", "awful", "flat", "tedious", "stale", "weak", "clumsy", "bland"]
FILL = ["the", "movie", "film", "was", "a", "story", "and", "plot", "really", "very", "is", "it", "cast",
        "script", "ending", "scene", "director", "quite", "but", "with", "of", "an", "at", "times"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
MINILM = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
              intermediate_size=1536, max_position_embeddings=512)
# For dry runs and tests: the same code path in a second.
TINY = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=64)
SHAPES = {"minilm": MINILM, "tiny": TINY}


def write_model(path: str, seed: int = 0, shape: dict = MINILM) -> str:
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    os.makedirs(path, exist_ok=True)
    vocab_file = os.path.join(path, "vocab.txt")
    with open(vocab_file, "w") as f:
        f.write("\n".join(SPECIAL + POS + NEG + FILL) + "\n")
    BertTokenizerFast(vocab_file=vocab_file, do_lower_case=True).save_pretrained(path)
    torch.manual_seed(seed)
    BertForSequenceClassification(BertConfig(**shape, num_labels=2)).save_pretrained(path)
    return path


def write_data(path: str, rows: int = 1200, seed: int = 0) -> str:
    rng = random.Random(seed)
    lines = ["text,label"]
    for i in range(rows):
        y = i % 2
        words = rng.sample(FILL, 6) + rng.sample(POS if y else NEG, 2)
        rng.shuffle(words)
        lines.append(f"{' '.join(words)},{'pos' if y else 'neg'}")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir")
    ap.add_argument("--rows", type=int, default=1200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="minilm")
    a = ap.parse_args(argv)
    model = write_model(os.path.join(a.dir, "model"), a.seed, SHAPES[a.shape])
    data = write_data(os.path.join(a.dir, "data.csv"), a.rows, a.seed)
    print(f"synthetic task: {a.shape} model {model}, data {data} ({a.rows} rows)")


if __name__ == "__main__":
    main()
