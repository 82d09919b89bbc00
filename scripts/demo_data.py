#!/usr/bin/env python3
"""Writes the embedded SST-2 data (demo/data/SST-2) from a GLUE SST-2 directory: dev.tsv as it
is, and train.tsv as a seeded sample of the train split, in file order.

  python3 scripts/demo_data.py --glue ../shared/data/glue/SST-2 --out demo/data/SST-2 \
      --parquet demo/data/nyu-mll-glue

With `--parquet DIR` it also writes the same rows as the Hugging Face hub dataset `nyu-mll/glue`
holds them (`DIR/sst2/train-00000-of-00001.parquet` and `validation-…`: columns `sentence`,
`label` int64, `idx` int32 (the row's index in the full split), snappy, with the hub's
`huggingface` schema metadata), for the tests' mock hub. That part needs pyarrow; the rest is
standard library only. The same inputs give the same bytes.
"""
import argparse
import os
import random

TRAIN_SAMPLE = 5000
SEED = 20261206


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--glue", required=True, help="the GLUE SST-2 directory")
    parser.add_argument("--out", required=True)
    parser.add_argument("--parquet", help="also write the hub dataset's parquet files here")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.glue, "dev.tsv"), encoding="utf-8") as f:
        dev = f.read()
    with open(os.path.join(args.glue, "train.tsv"), encoding="utf-8") as f:
        header, *rows = f.read().splitlines(keepends=True)
    keep = sorted(random.Random(SEED).sample(range(len(rows)), TRAIN_SAMPLE))
    with open(os.path.join(args.out, "dev.tsv"), "w", encoding="utf-8") as f:
        f.write(dev)
    with open(os.path.join(args.out, "train.tsv"), "w", encoding="utf-8") as f:
        f.write(header + "".join(rows[i] for i in keep))
    if args.parquet:
        dev_rows = dev.splitlines(keepends=True)[1:]
        write_parquet(args.parquet, "validation", dev_rows, range(len(dev_rows)))
        write_parquet(args.parquet, "train", [rows[i] for i in keep], keep)


HUB_FEATURES = (
    '{"info": {"features": {"sentence": {"dtype": "string", "_type": "Value"}, '
    '"label": {"names": ["negative", "positive"], "_type": "ClassLabel"}, '
    '"idx": {"dtype": "int32", "_type": "Value"}}}}'
)


def write_parquet(root, split, rows, indices):
    """Writes `rows` (GLUE TSV lines) as `root/sst2/<split>-00000-of-00001.parquet`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fields = [line.rstrip("\n").split("\t") for line in rows]
    schema = pa.schema(
        [("sentence", pa.string()), ("label", pa.int64()), ("idx", pa.int32())],
        metadata={"huggingface": HUB_FEATURES},
    )
    table = pa.table(
        {
            "sentence": [f[0] for f in fields],
            "label": [int(f[1]) for f in fields],
            "idx": list(indices),
        },
        schema=schema,
    )
    os.makedirs(os.path.join(root, "sst2"), exist_ok=True)
    path = os.path.join(root, "sst2", f"{split}-00000-of-00001.parquet")
    pq.write_table(table, path, compression="snappy")


if __name__ == "__main__":
    main()
