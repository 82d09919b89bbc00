#!/usr/bin/env python3
"""Optional: PyTorch's time for the training step that `cargo bench --bench train_step` times.

Never needed by the build or the tests. In a throwaway virtualenv outside the repo (see
compare_runtimes.py), with the same threads as the Rust bench:

  RAYON_NUM_THREADS=2 cargo bench --bench train_step
  /tmp/venv/bin/python scripts/compare_pytorch_train.py ../shared/models/minilm-l6-sst2 --threads 2

The step: MiniLM-L6 in train mode with dropout off (axcompress trains without dropout), the first
32 SST-2 dev sentences padded to the longest, cross-entropy (task) or T=2 distillation from a frozen
copy (distill), backward, torch.optim.AdamW (lr 1e-5, decay 0.01) after clipping at norm 1, with
the embeddings frozen as axcompress freezes them. Median of 10 steps after 3 warm-up steps.
"""
import argparse
import copy
import csv
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

DEV = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "glue", "SST-2", "dev.tsv")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    with open(DEV, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[:32]
    tok = AutoTokenizer.from_pretrained(a.model)
    enc = tok([r["sentence"] for r in rows], padding=True, truncation=True, max_length=128, return_tensors="pt")
    labels = torch.tensor([int(r["label"]) for r in rows])
    print(f"batch 32 x {enc['input_ids'].shape[1]} tokens, {a.threads} threads, torch {torch.__version__}")
    print("objective     forward ms  backward ms  optimizer ms  step ms")
    for name in ["task", "distill"]:
        model = AutoModelForSequenceClassification.from_pretrained(a.model, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        teacher = copy.deepcopy(model).eval()
        model.train()
        for n, prm in model.named_parameters():
            prm.requires_grad = "embeddings" not in n
        decay = [p for n, p in model.named_parameters() if p.requires_grad and n.endswith("weight") and "LayerNorm" not in n]
        other = [p for n, p in model.named_parameters() if p.requires_grad and not (n.endswith("weight") and "LayerNorm" not in n)]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": other, "weight_decay": 0.0}], lr=1e-5)
        times = {"f": [], "b": [], "u": []}
        for i in range(13):
            t0 = time.perf_counter()
            logits = model(**enc).logits
            if name == "task":
                loss = F.cross_entropy(logits, labels)
            else:
                with torch.no_grad():
                    t_logits = teacher(**enc).logits
                loss = 4.0 * F.kl_div(F.log_softmax(logits / 2, -1), F.log_softmax(t_logits / 2, -1), log_target=True, reduction="batchmean")
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
            t3 = time.perf_counter()
            if i >= 3:
                times["f"].append((t1 - t0) * 1e3)
                times["b"].append((t2 - t1) * 1e3)
                times["u"].append((t3 - t2) * 1e3)
        f, b, u = (statistics.median(times[k]) for k in "fbu")
        print(f"{name:<12} {f:>10.1f}  {b:>11.1f}  {u:>12.1f}  {f + b + u:>7.1f}")


if __name__ == "__main__":
    main()
