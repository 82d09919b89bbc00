#!/usr/bin/env python3
"""ONNX Runtime checks of `axcompress export --format onnx` output (interop and speed).

Needs only onnxruntime, numpy and tokenizers (no torch); with the onnx package too, check and
reference also run onnx's checker (full_check) and strict shape inference on the file and report
"onnx_checker": "passed" (or the error; exit 1). In a virtualenv outside the repo:

  python -m venv /tmp/venv && /tmp/venv/bin/pip install onnxruntime numpy tokenizers onnx
  /tmp/venv/bin/python scripts/onnx_check.py check out/onnx --reference out/model \
      --task sst2 --data ../shared/data/glue/SST-2

check ONNX_DIR   Runs ONNX_DIR/model.onnx in ONNX Runtime (or, --runtime openvino, in OpenVINO at
                 f32) on a GLUE dev split (tokenized with the
                 tokenizer.json beside it: no padding but per batch, longest-first truncation at
                 --max-length), and `axcompress eval --predictions` on the --reference model
                 directory. Prints JSON: examples, identical predictions (fraction), the largest
                 absolute logit difference, and both accuracies. Exits 1 when the predictions
                 agree on fewer than --min-agreement of the examples.
reference ONNX_DIR --reference-json FILE
                 Runs the file on the input ids, attention mask (and token types) of a reference
                 JSON written with transformers (tests/fixtures/models/*/reference.json) and
                 compares with its logits: prints the largest absolute difference, exits 1 above
                 --tolerance.
bench ONNX_DIR…  Back to back, with --threads intra-op threads: file size, dev accuracy, b32
                 sentences/s in file order and sorted by length (one warm-up batch), b1 p50/p90
                 ms over the first 200 dev sentences (10 warm-up calls). Prints JSON on stdout
                 and a Markdown table on stderr.
"""
import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
try:
    import onnxruntime as ort
except ImportError:  # --runtime openvino needs only openvino
    ort = None
from tokenizers import Tokenizer

AXCOMPRESS = os.path.join(os.path.dirname(__file__), "..", "target", "release", "axcompress")
# GLUE task: (directory name, text columns, the label names axcompress gives the TSV's labels).
TASKS = {"sst2": ("SST-2", ["sentence"], {"0": "negative", "1": "positive"}),
         "rte": ("RTE", ["sentence1", "sentence2"], {})}


def onnx_checker(directory):
    """onnx's checker and strict shape inference on model.onnx: "passed", "not run" (no onnx
    package), or the first line of the error."""
    try:
        import onnx
    except ImportError:
        return "not run"
    path = os.path.join(directory, "model.onnx")
    try:
        onnx.checker.check_model(path, full_check=True)
        onnx.shape_inference.infer_shapes(onnx.load(path), check_type=True, strict_mode=True,
                                          data_prop=True)
    except Exception as e:  # the checker raises several types; report any
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    return "passed"


def fail_unless_checked(report):
    if report["onnx_checker"] not in ("passed", "not run"):
        print(f"onnx checker: {report['onnx_checker']}", file=sys.stderr)
        sys.exit(1)


def load_dev(data, task):
    directory, columns, names = TASKS[task]
    path = data
    if os.path.isdir(path):
        nested = os.path.join(path, directory, "dev.tsv")
        path = nested if os.path.isfile(nested) else os.path.join(path, "dev.tsv")
    with open(path, newline="") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(rows)
        index = [header.index(c) for c in columns]
        label = header.index("label")
        return [(tuple(r[i] for i in index), names.get(r[label], r[label])) for r in rows]


class OnnxClassifier:
    """model.onnx and its tokenizer: texts in, logits out."""

    def __init__(self, directory, threads, max_length, runtime="onnxruntime"):
        path = os.path.join(directory, "model.onnx")
        if runtime == "openvino":
            import openvino
            # f32: OpenVINO's CPU default is bf16 where the CPU has it.
            compiled = openvino.Core().compile_model(path, "CPU", {
                "INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads})
            self.inputs = [i.get_any_name() for i in compiled.inputs]
            self.run = lambda feed: compiled(feed)[compiled.outputs[0]]
        else:
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            self.inputs = [i.name for i in session.get_inputs()]
            self.run = lambda feed: session.run(["logits"], feed)[0]
        self.tokenizer = Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length, strategy="longest_first")

    def encode(self, texts):
        """Padded inputs for a batch of texts (tuples of one or two strings)."""
        encodings = self.tokenizer.encode_batch([t if len(t) > 1 else t[0] for t in texts])
        length = max(len(e.ids) for e in encodings)
        feed = {n: np.zeros((len(texts), length), dtype=np.int64) for n in
                ["input_ids", "attention_mask", "token_type_ids"]}
        for row, e in enumerate(encodings):
            n = len(e.ids)
            feed["input_ids"][row, :n] = e.ids
            feed["attention_mask"][row, :n] = 1
            feed["token_type_ids"][row, :n] = e.type_ids
        return {n: feed[n] for n in self.inputs}

    def logits(self, feed):
        return self.run(feed)


def batches(classifier, texts, size):
    return [classifier.encode(texts[b:b + size]) for b in range(0, len(texts), size)]


def axcompress_predictions(binary, reference, task, data, max_length):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "predictions.json")
        cmd = [binary, "eval", "--model", reference, "--task", task, "--data", data, "--quiet",
               "--max-length", str(max_length), "--predictions", path]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        with open(path) as f:
            return json.load(f)


def check(args):
    data = load_dev(args.data, args.task)
    classifier = OnnxClassifier(args.onnx_dirs[0], args.threads, args.max_length, args.runtime)
    texts = [t for t, _ in data]
    ours = np.concatenate([classifier.logits(f) for f in batches(classifier, texts, args.batch_size)])
    reference = axcompress_predictions(args.axcompress, args.reference, args.task, args.data,
                                       args.max_length)
    theirs = np.array(reference["logits"], dtype=np.float32)
    # The label each output index stands for, as axcompress names it.
    names = {int(i): p for i, p in zip(theirs.argmax(1), reference["predicted"])}
    ours_named = [names.get(int(i), str(int(i))) for i in ours.argmax(1)]
    agree = float(np.mean(ours.argmax(1) == theirs.argmax(1)))
    gold = [label for _, label in data]
    report = {
        "onnx": args.onnx_dirs[0],
        "reference": args.reference,
        "examples": len(data),
        "identical_predictions": agree,
        "max_abs_logit_diff": float(np.abs(ours - theirs).max()),
        "onnx_accuracy": float(np.mean([p == g for p, g in zip(ours_named, gold)])),
        "axcompress_accuracy": float(np.mean([p == g for p, g in zip(reference["predicted"], gold)])),
        "onnx_checker": onnx_checker(args.onnx_dirs[0]),
    }
    print(json.dumps(report, indent=2))
    fail_unless_checked(report)
    if agree < args.min_agreement:
        print(f"predictions agree on {agree:.4f} of dev, below --min-agreement {args.min_agreement}",
              file=sys.stderr)
        sys.exit(1)


def reference(args):
    with open(args.reference_json) as f:
        ref = json.load(f)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    session = ort.InferenceSession(os.path.join(args.onnx_dirs[0], "model.onnx"), options,
                                   providers=["CPUExecutionProvider"])
    ids = np.array(ref["input_ids"], dtype=np.int64)
    feed = {"input_ids": ids, "attention_mask": np.array(ref["attention_mask"], dtype=np.int64),
            "token_type_ids": np.array(ref.get("token_type_ids") or np.zeros_like(ids), dtype=np.int64)}
    names = [i.name for i in session.get_inputs()]
    logits = session.run(["logits"], {n: feed[n] for n in names})[0]
    diff = float(np.abs(logits - np.array(ref["logits"], dtype=np.float32)).max())
    report = {"onnx": args.onnx_dirs[0], "reference": args.reference_json,
              "max_abs_logit_diff": diff, "onnx_checker": onnx_checker(args.onnx_dirs[0])}
    print(json.dumps(report, indent=2))
    fail_unless_checked(report)
    if diff > args.tolerance:
        print(f"logits differ from the reference by {diff}, above --tolerance {args.tolerance}",
              file=sys.stderr)
        sys.exit(1)


def throughput(classifier, encoded, n):
    classifier.logits(encoded[0])
    start = time.perf_counter()
    for feed in encoded:
        classifier.logits(feed)
    return round(n / (time.perf_counter() - start), 2)


def latency(classifier, singles, warmup=10):
    for feed in singles[:warmup]:
        classifier.logits(feed)
    times = []
    for feed in singles:
        start = time.perf_counter()
        classifier.logits(feed)
        times.append((time.perf_counter() - start) * 1000)
    return {"p50_ms": round(statistics.median(times), 3),
            "p90_ms": round(statistics.quantiles(times, n=10)[8], 3)}


def measure(directory, data, args):
    classifier = OnnxClassifier(directory, args.threads, args.max_length)
    texts = [t for t, _ in data]
    in_file_order = batches(classifier, texts, 32)
    lengths = [len(e.ids) for e in classifier.tokenizer.encode_batch(
        [t if len(t) > 1 else t[0] for t in texts])]
    by_length = [t for _, _, t in sorted(zip(lengths, range(len(texts)), texts))]
    return {"model": directory,
            "bytes": os.path.getsize(os.path.join(directory, "model.onnx")),
            "b32_file_sent_per_s": throughput(classifier, in_file_order, len(texts)),
            "b32_sorted_sent_per_s": throughput(classifier, batches(classifier, by_length, 32), len(texts)),
            "b1": latency(classifier, batches(classifier, texts[:200], 1))}


def bench(args):
    data = load_dev(args.data, args.task)
    rows = [measure(d, data, args) for d in args.onnx_dirs]
    print(json.dumps({"threads": args.threads, "onnxruntime": ort.__version__, "rows": rows}, indent=2))
    print("| model | MB | b32 file order sent/s | b32 sorted sent/s | b1 p50 ms | b1 p90 ms |", file=sys.stderr)
    print("|---|---|---|---|---|---|", file=sys.stderr)
    for r in rows:
        print(f"| {os.path.basename(os.path.normpath(r['model']))} | {r['bytes'] / 1e6:.1f} | "
              f"{r['b32_file_sent_per_s']:.1f} | {r['b32_sorted_sent_per_s']:.1f} | "
              f"{r['b1']['p50_ms']:.2f} | {r['b1']['p90_ms']:.2f} |", file=sys.stderr)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["check", "reference", "bench"])
    ap.add_argument("onnx_dirs", nargs="+", help="directories written by axcompress export --format onnx")
    ap.add_argument("--reference", help="check: the axcompress model directory the ONNX file came from")
    ap.add_argument("--task", choices=sorted(TASKS), default="sst2")
    ap.add_argument("--data", help="GLUE directory (holding SST-2/dev.tsv) or a dev.tsv")
    ap.add_argument("--reference-json", help="reference: transformers' inputs and logits")
    ap.add_argument("--tolerance", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32, help="check: sentences per ONNX Runtime call")
    ap.add_argument("--min-agreement", type=float, default=0.995)
    ap.add_argument("--runtime", choices=["onnxruntime", "openvino"], default="onnxruntime",
                    help="check: run the file in ONNX Runtime or in OpenVINO (pip install openvino; f32)")
    ap.add_argument("--axcompress", default=AXCOMPRESS)
    args = ap.parse_args()
    if args.what == "reference":
        if not args.reference_json:
            ap.error("reference needs --reference-json")
        return reference(args)
    if not args.data:
        ap.error(f"{args.what} needs --data")
    if args.what == "check":
        if not args.reference:
            ap.error("check needs --reference")
        check(args)
    else:
        bench(args)


if __name__ == "__main__":
    main()
