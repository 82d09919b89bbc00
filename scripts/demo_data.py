#!/usr/bin/env python3
"""Writes the embedded SST-2 data (demo/data/SST-2) from a GLUE SST-2 directory: dev.tsv as it
is, and train.tsv as a seeded sample of the train split, in file order.

  python3 scripts/demo_data.py --glue ../shared/data/glue/SST-2 --out demo/data/SST-2

Standard library only; the same inputs give the same bytes.
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


if __name__ == "__main__":
    main()
