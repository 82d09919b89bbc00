#!/usr/bin/env python3
"""Writes a selection file of perturbed train sentences labelled by the model itself.

Optional, never needed by the build or the tests (needs torch and transformers). A fine-tuned
model has seen every train sentence, so a train hold-out hides how much pruning costs on new
text; dev is small, and deciding on half of it over-fits the decisions. This samples train
sentences, replaces each word with probability P by a word of another sampled sentence, and
labels the result with the model's own prediction, so `--on FILE` judges agreement with the
original model on sentences it has not seen:

    python scripts/perturbed_selection.py MODEL_DIR ../shared/data/glue/SST-2/train.tsv OUT.tsv \
        [--seed 0] [--count 2000] [--p 0.2]

Single-sentence tasks (SST-2 layout: sentence, label) only.
"""
import argparse
import random

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("train")
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--p", type=float, default=0.2)
    a = ap.parse_args()
    random.seed(a.seed)
    with open(a.train) as f:
        rows = [line.rstrip("\n").split("\t") for line in f][1:]
    picked = random.sample(rows, a.count)
    words = [w for r in picked for w in r[0].split()]
    sentences = [
        " ".join(w if random.random() >= a.p else random.choice(words) for w in r[0].split())
        for r in picked
    ]
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForSequenceClassification.from_pretrained(a.model).eval()
    labels = []
    with torch.no_grad():
        for i in range(0, len(sentences), 64):
            batch = tok(sentences[i : i + 64], padding=True, truncation=True, max_length=128,
                        return_tensors="pt")
            labels += model(**batch).logits.argmax(-1).tolist()
    with open(a.out, "w") as f:
        f.write("sentence\tlabel\n")
        for s, y in zip(sentences, labels):
            f.write(f"{s}\t{y}\n")


if __name__ == "__main__":
    main()
