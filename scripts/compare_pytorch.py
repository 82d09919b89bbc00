#!/usr/bin/env python3
"""Optional: the PyTorch side of the README's speed and interoperability figures.

Never needed by the build or the tests. In a throwaway virtualenv outside the repo:

  python -m venv /tmp/venv && /tmp/venv/bin/pip install torch transformers compressed-tensors
  cargo build --release
  /tmp/venv/bin/python scripts/compare_pytorch.py bench ../shared/models/minilm-l6-sst2 \
      --also out/sst2-size --also out/sst2-int8
  /tmp/venv/bin/python scripts/compare_pytorch.py accuracy out/int8

bench MODEL_DIR     In one run, on SST-2 dev with the same threads (--threads, default 2):
                    PyTorch fp32 as loaded and torch.ao.quantization.quantize_dynamic
                    (nn.Linear, qint8): dev accuracy, b32 sentences/s in file order and sorted by
                    length (max length 128, padding per batch, tokenization excluded, one warm-up
                    batch), b1 p50/p90 ms over the first 200 dev sentences (10 warm-up calls).
                    Then `axcompress bench --json` (--axcompress, default target/release/axcompress)
                    of MODEL_DIR and of every --also DIR, in file order and sorted. Prints one JSON
                    object on stdout and a Markdown table on stderr.
accuracy MODEL_DIR  dev accuracy of a model directory with stock transformers; an axcompress
                    compressed-tensors export is loaded with CompressedTensorsConfig(dequantize=True).
"""
import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

DEV = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "glue", "SST-2", "dev.tsv")
AXCOMPRESS = os.path.join(os.path.dirname(__file__), "..", "target", "release", "axcompress")


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


def by_length(tok, sentences, max_length):
    lengths = [len(ids) for ids in tok(sentences, truncation=True, max_length=max_length)["input_ids"]]
    return [s for _, _, s in sorted(zip(lengths, range(len(sentences)), sentences))]


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


def dev_accuracy(model, encoded, labels):
    predicted = []
    with torch.inference_mode():
        for enc in encoded:
            predicted += model(**enc).logits.argmax(-1).tolist()
    return sum(int(p == l) for p, l in zip(predicted, labels)) / len(labels)


def measure_torch(model, tok, data):
    sentences = [s for s, _ in data]
    in_file_order = batches(tok, sentences, 32, 128)
    return {"accuracy": dev_accuracy(model, in_file_order, [l for _, l in data]),
            "b32_file_sent_per_s": throughput(model, in_file_order, len(sentences)),
            "b32_sorted_sent_per_s": throughput(model, batches(tok, by_length(tok, sentences, 128), 32, 128),
                                                len(sentences)),
            "b1": latency(model, batches(tok, sentences[:200], 1, 128))}


def measure_axcompress(binary, model_dir, data_dir, threads):
    out = {}
    for order in ["file", "sorted"]:
        cmd = [binary, "bench", "--model", model_dir, "--task", "sst2", "--data", data_dir, "--json",
               "--quiet", "--threads", str(threads), "--order", order]
        result = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        row = result["results"]["model"]
        out["accuracy"] = row["metrics"]["accuracy"]
        out[f"b32_{order}_sent_per_s"] = round(row["throughput_sentences_per_second"]["median"], 2)
        if order == "sorted":
            out["b1"] = {"p50_ms": round(row["latency_b1_ms"]["p50"], 3),
                         "p90_ms": round(row["latency_b1_ms"]["p90"], 3)}
    return out


def bench(args):
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    model = load_model(args.model_dir)
    data = load_dev(args.dev)
    out = {"model_dir": args.model_dir, "threads": torch.get_num_threads(), "torch": torch.__version__,
           "rows": []}
    out["rows"].append({"runtime": "PyTorch fp32", "model": args.model_dir, **measure_torch(model, tok, data)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qmodel = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    out["rows"].append({"runtime": "PyTorch dynamic int8", "model": args.model_dir,
                        **measure_torch(qmodel, tok, data)})
    if os.path.exists(args.axcompress):
        for model_dir in [args.model_dir] + args.also:
            out["rows"].append({"runtime": "axcompress", "model": model_dir,
                                **measure_axcompress(args.axcompress, model_dir, os.path.dirname(args.dev),
                                                     args.threads)})
    else:
        print(f"no axcompress binary at {args.axcompress}: PyTorch only (cargo build --release)", file=sys.stderr)
    return out


def print_table(report):
    print("| runtime | model | dev accuracy | b32 file order sent/s | b32 sorted sent/s | b1 p50 ms | b1 p90 ms |",
          file=sys.stderr)
    print("|---|---|---|---|---|---|---|", file=sys.stderr)
    for r in report["rows"]:
        print(f"| {r['runtime']} | {os.path.basename(os.path.normpath(r['model']))} | {r['accuracy']:.4f} | "
              f"{r['b32_file_sent_per_s']:.1f} | {r['b32_sorted_sent_per_s']:.1f} | {r['b1']['p50_ms']:.2f} | "
              f"{r['b1']['p90_ms']:.2f} |", file=sys.stderr)


def accuracy(args):
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    data = load_dev(args.dev)
    encoded = batches(tok, [s for s, _ in data], 32, 128)
    return {"model_dir": args.model_dir, "examples": len(data),
            "accuracy": dev_accuracy(load_model(args.model_dir), encoded, [l for _, l in data])}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["bench", "accuracy"])
    ap.add_argument("model_dir")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dev", default=DEV)
    ap.add_argument("--axcompress", default=AXCOMPRESS)
    ap.add_argument("--also", action="append", default=[], help="more axcompress model directories")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    report = bench(args) if args.what == "bench" else accuracy(args)
    print(json.dumps(report, indent=1))
    if args.what == "bench":
        print_table(report)


if __name__ == "__main__":
    main()
