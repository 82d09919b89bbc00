#!/usr/bin/env python3
"""Optional: PyTorch and ONNX Runtime beside axcompress, in one harness (speed and interop).

Never needed by the build or the tests. In a throwaway virtualenv outside the repo:

  python -m venv /tmp/venv && /tmp/venv/bin/pip install torch transformers onnx onnxruntime \
      onnxscript compressed-tensors
  cargo build --release
  /tmp/venv/bin/python scripts/compare_runtimes.py bench ../shared/models/minilm-l6-sst2 \
      --also out/sst2-deploy
  /tmp/venv/bin/python scripts/compare_runtimes.py accuracy out/int8

bench MODEL_DIR     In one run, on SST-2 dev with the same threads (--threads, default 2), every
                    runtime measured the same way: dev accuracy, b32 sentences/s in file order and
                    sorted by length (max length 128, padding per batch, tokenization excluded,
                    one warm-up batch), b1 p50/p90 ms over the first 200 dev sentences (10 warm-up
                    calls). The rows:
                    - PyTorch fp32 as loaded, and torch.ao.quantization.quantize_dynamic
                      (nn.Linear, qint8);
                    - ONNX Runtime fp32: torch.onnx.export (dynamic batch and sequence axes), then
                      onnxruntime.transformers.optimizer.optimize_model (model_type bert, the
                      fused attention, LayerNorm and GELU); ONNX Runtime dynamic int8:
                      onnxruntime.quantization.quantize_dynamic (QInt8 weights) of the optimised
                      graph (--no-onnx skips both);
                    - axcompress fp32 (`axcompress bench --json`, --axcompress, default
                      target/release/axcompress) of MODEL_DIR, axcompress int8 (`axcompress
                      quantize --bits 8` of MODEL_DIR into --work), and every --also DIR.
                    Prints one JSON object on stdout and a Markdown table on stderr.
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
import tempfile
import time
import types
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


def onnx_models(model, tok, work):
    """The fp32 model exported, optimised and dynamically quantized for ONNX Runtime: paths."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model

    exported, optimised, int8 = (os.path.join(work, f) for f in
                                 ["model.onnx", "model-opt.onnx", "model-opt-int8.onnx"])
    sample = dict(tok(["a first sentence", "and a second one"], padding=True, return_tensors="pt"))
    # In the order of the model's forward signature, which is how the exporter names the inputs.
    names = [n for n in ["input_ids", "attention_mask", "token_type_ids"] if n in sample]
    sample = {n: sample[n] for n in names}
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    axes["logits"] = {0: "batch"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (sample,), exported, input_names=names, output_names=["logits"],
                          dynamic_axes=axes, opset_version=17, dynamo=False)
    config = model.config
    optimize_model(exported, model_type="bert", num_heads=config.num_attention_heads,
                   hidden_size=config.hidden_size).save_model_to_file(optimised)
    # The fused operators (com.microsoft domain) have no inferred output types: say they are f32.
    quantize_dynamic(optimised, int8, weight_type=QuantType.QInt8,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    return optimised, int8


class OrtModel:
    """An ONNX Runtime session called like the PyTorch model: keyword tensors in, `.logits` out."""

    def __init__(self, path, threads):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]

    def __call__(self, **encoded):
        feed = {n: encoded[n].numpy() for n in self.inputs}
        return types.SimpleNamespace(logits=torch.from_numpy(self.session.run(["logits"], feed)[0]))


def measure_onnx(model, tok, data, work, threads):
    import onnxruntime as ort

    optimised, int8 = onnx_models(model, tok, work)
    label = f"ONNX Runtime {ort.__version__}"
    return [{"runtime": f"{label} fp32, optimised", "model": optimised,
             **measure_torch(OrtModel(optimised, threads), tok, data)},
            {"runtime": f"{label} dynamic int8", "model": int8,
             **measure_torch(OrtModel(int8, threads), tok, data)}]


def axcompress_int8(binary, model_dir, data_dir, work):
    out = os.path.join(work, "axcompress-int8")
    cmd = [binary, "quantize", "--model", model_dir, "--task", "sst2", "--data", data_dir, "--bits",
           "8", "--out", out, "--quiet"]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return out


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
    work = args.work or tempfile.mkdtemp(prefix="compare-runtimes-")
    os.makedirs(work, exist_ok=True)
    out = {"model_dir": args.model_dir, "threads": args.threads, "torch": torch.__version__,
           "rows": []}
    out["rows"].append({"runtime": "PyTorch fp32", "model": args.model_dir, **measure_torch(model, tok, data)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qmodel = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    out["rows"].append({"runtime": "PyTorch dynamic int8", "model": args.model_dir,
                        **measure_torch(qmodel, tok, data)})
    if not args.no_onnx:
        out["rows"] += measure_onnx(model, tok, data, work, args.threads)
    if os.path.exists(args.axcompress):
        data_dir = os.path.dirname(args.dev)
        dirs = [args.model_dir, axcompress_int8(args.axcompress, args.model_dir, data_dir, work)] + args.also
        for model_dir in dirs:
            out["rows"].append({"runtime": "axcompress", "model": model_dir,
                                **measure_axcompress(args.axcompress, model_dir, data_dir, args.threads)})
    else:
        print(f"no axcompress binary at {args.axcompress}: PyTorch and ONNX Runtime only (cargo build --release)",
              file=sys.stderr)
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
    ap.add_argument("--work", help="directory for the ONNX files and the int8 model (default: a new temp dir)")
    ap.add_argument("--no-onnx", action="store_true", help="skip ONNX Runtime")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    report = bench(args) if args.what == "bench" else accuracy(args)
    print(json.dumps(report, indent=1))
    if args.what == "bench":
        print_table(report)


if __name__ == "__main__":
    main()
