//! Writes a classifier of a real model's shape with seeded random weights, for measuring time
//! and memory at scale (`scripts/scale_bench.sh`). Accuracy on it means nothing.
//!
//!     cargo run --release --example scale_fixture -- bert-base OUT_DIR [TOKENIZER_DIR] [SEED]
//!
//! Shapes: bert-base, roberta-base, bert-large. The tokenizer files are copied from
//! TOKENIZER_DIR (default: the demo model, `demo/model`).

use std::path::PathBuf;

use axcompress::model::synthetic::{self, Shape};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [shape, out, rest @ ..] = args.as_slice() else {
        anyhow::bail!("usage: scale_fixture SHAPE OUT_DIR [TOKENIZER_DIR] [SEED]");
    };
    let tokenizer = rest
        .first()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("demo/model"));
    let seed = match rest.get(1) {
        Some(s) => s.parse()?,
        None => 0,
    };
    synthetic::write(Shape::parse(shape)?, &tokenizer, &PathBuf::from(out), seed)?;
    eprintln!("wrote {shape} to {out} (random weights: measure time and memory only)");
    Ok(())
}
