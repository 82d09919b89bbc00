#!/usr/bin/env python3
"""Optional: the PyTorch side of the README's speed and interoperability figures.

Never needed by the build or the tests. In a throwaway virtualenv outside the repo:

  python -m venv /tmp/venv && /tmp/venv/bin/pip install torch transformers compressed-tensors
  /tmp/venv/bin/python scripts/compare_pytorch.py bench ../shared/models/minilm-l6-sst2
  /tmp/venv/bin/python scripts/compare_pytorch.py accuracy out/int8

bench MODEL_DIR     fp32 as loaded and torch.ao.quantization.quantize_dynamic (nn.Linear, qint8):
                    b32 sentences/s over SST-2 dev in file order (max length 128, padding per
                    batch, tokenization excluded, one warm-up batch) and b1 p50/p90 ms over the
                    first 200 dev sentences (10 warm-up calls). --threads (default 2).
accuracy MODEL_DIR  dev accuracy of a model directory with stock transformers; an axcompress
                    compressed-tensors export is loaded with CompressedTensorsConfig(dequantize=True).

Prints one JSON object on stdout.
"""
import argparse
import csv
import json
import os
import statistics
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

DEV = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "glue", "SST-2", "dev.tsv")


def load_dev(path, limit=None):
    with open(path, newline="") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(rows)
        s, l = header.index("sentence"), header.index("label")
        data = [(r[s], int(r[l])) for r in rows]
    return data[:limit] if limit else data


def load_model(model_dir):
    config = json.load(open(os.path.join(model_dir, "config.json")))
    kwargs = {}
    if "quantization_config" in config:
        from transformers import CompressedTensorsConfig

        kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    return AutoModelForSequenceClassification.from_pretrained(model_dir, **kwargs).eval()


def batches(tok, sentences, size, max_length):
    return [dict(tok(sentences[b:b + size], padding=True, truncation=True,
                     max_length=max_length, return_tensors="pt"))
            for b in range(0, len(sentences), size)]


def throughput(model, encoded, n):
    with torch.inference_mode():
        model(**encoded[0])
        start = time.perf_counter()
        for enc in encoded:
            model(**enc)
        seconds = time.perf_counter() - start
    return round(n / seconds, 2)


def latency(model, singles, warmup=10):
    times = []
    with torch.inference_mode():
        for enc in singles[:warmup]:
            model(**enc)
        for enc in singles:
            start = time.perf_counter()
            model(**enc)
            times.append((time.perf_counter() - start) * 1000)
    return {"p50_ms": round(statistics.median(times), 3),
            "p90_ms": round(statistics.quantiles(times, n=10)[8], 3)}


def bench(args):
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    model = load_model(args.model_dir)
    sentences = [s for s, _ in load_dev(args.dev)]
    encoded = batches(tok, sentences, 32, 128)
    singles = batches(tok, sentences[:200], 1, 128)
    out = {"model_dir": args.model_dir, "threads": torch.get_num_threads(), "torch": torch.__version__}
    out["fp32"] = {"b32_sent_per_s": throughput(model, encoded, len(sentences)),
                   "b1": latency(model, singles)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qmodel = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    out["dynamic_int8"] = {"b32_sent_per_s": throughput(qmodel, encoded, len(sentences)),
                           "b1": latency(qmodel, singles)}
    return out


def accuracy(args):
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    model = load_model(args.model_dir)
    data = load_dev(args.dev)
    correct = 0
    with torch.inference_mode():
        for b in range(0, len(data), 32):
            chunk = data[b:b + 32]
            enc = tok([s for s, _ in chunk], padding=True, truncation=True, max_length=128,
                      return_tensors="pt")
            predicted = model(**enc).logits.argmax(-1).tolist()
            correct += sum(int(p == label) for p, (_, label) in zip(predicted, chunk))
    return {"model_dir": args.model_dir, "examples": len(data), "accuracy": correct / len(data)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["bench", "accuracy"])
    ap.add_argument("model_dir")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dev", default=DEV)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(json.dumps(bench(args) if args.what == "bench" else accuracy(args), indent=1))


if __name__ == "__main__":
    main()
