//! `axcompress inspect`: what a model is made of.

use anyhow::Result;
use serde_json::{json, Value};

use super::print_json;
use crate::cli::{Cli, InspectArgs};
use crate::export::{compatibility, loads_in};
use crate::formats::quant::unquantizable;
use crate::model::linear::Weight;
use crate::model::Model;

/// Runs `axcompress inspect`.
pub fn run(args: &InspectArgs, cli: &Cli) -> Result<()> {
    let model = Model::load(&args.model.model, &args.model.hub(), cli.runtime())?;
    let report = describe(&model)?;
    if cli.json {
        return print_json(&report);
    }
    let c = &model.config;
    println!(
        "{}  {}  family {}  hidden {}  head size {}  labels [{}]",
        args.model.model,
        model.dir.display(),
        c.family.name(),
        c.hidden_size,
        c.structure.head_size,
        c.labels.join(", ")
    );
    println!("layer  heads  ffn    attention            kept heads");
    for (i, l) in c.structure.layers.iter().enumerate() {
        let heads = l
            .heads
            .as_ref()
            .map_or("removed".to_string(), |h| h.len().to_string());
        let ffn = l.ffn_width.map_or("removed".to_string(), |w| w.to_string());
        let mode = match (&l.heads, l.attention_mode) {
            (None, _) => "-".to_string(),
            (Some(_), None) => "dense".to_string(),
            (Some(_), Some(m)) => m.to_string(),
        };
        let kept = l.heads.as_ref().map_or(String::new(), |h| format!("{h:?}"));
        println!("{i:<6} {heads:<6} {ffn:<6} {mode:<20} {kept}");
    }
    let compat = compatibility(&model);
    let onnx = model.dir.join("model.onnx").is_file();
    println!("{}", loads_in(&compat, model.is_quantized(), onnx));
    println!("parameters {}", model.parameter_count());
    for (dtype, (params, bytes)) in &model.disk_dtypes {
        println!("  on disk {dtype}: {params} parameters, {bytes} bytes");
    }
    println!("matrix                                         shape         precision  runs as");
    for m in matrices(&model)? {
        println!(
            "{:<46} {:<13} {:<10} {}",
            m["name"].as_str().unwrap_or_default(),
            format!("{}x{}", m["shape"][0], m["shape"][1]),
            m["precision"].as_str().unwrap_or_default(),
            m["runs_as"].as_str().unwrap_or_default()
        );
    }
    Ok(())
}

/// Every weight matrix: Hugging Face name, shape, precision, and how it runs (with why, when a
/// matrix cannot be quantized).
fn matrices(model: &Model) -> Result<Vec<Value>> {
    model
        .matrices()
        .into_iter()
        .map(|m| {
            let w = model.weight(m)?;
            let (rows, cols) = w.dims();
            let runs_as = match &w {
                Weight::Quantized(q) => q.runs_as().to_string(),
                Weight::Striped(s) => s.runs_as(),
                _ => match unquantizable(cols) {
                    Some(why) => format!("f32; cannot be quantized: {why}"),
                    None => "f32".to_string(),
                },
            };
            Ok(json!({
                "name": m.hf_name(model),
                "shape": [rows, cols],
                "precision": w.precision(),
                "runs_as": runs_as,
            }))
        })
        .collect()
}

/// The JSON description printed by `inspect --json`.
pub fn describe(model: &Model) -> Result<Value> {
    let c = &model.config;
    let layers: Vec<Value> = c
        .structure
        .layers
        .iter()
        .enumerate()
        .map(|(i, l)| {
            json!({
                "layer": i,
                "present": !l.is_removed(),
                "attention": l.heads.is_some(),
                "heads": l.head_count(),
                "kept_heads": l.heads,
                "attention_mode": l.attention_mode,
                "ffn": l.ffn_width.is_some(),
                "ffn_width": l.ffn_width,
            })
        })
        .collect();
    let dtypes: serde_json::Map<String, Value> = model
        .disk_dtypes
        .iter()
        .map(|(d, (p, b))| (d.clone(), json!({"parameters": p, "bytes": b})))
        .collect();
    let compat = compatibility(model);
    Ok(json!({
        "dir": model.dir.display().to_string(),
        "family": c.family.name(),
        "hidden_size": c.hidden_size,
        "head_size": c.structure.head_size,
        "original_heads": c.structure.original_heads,
        "vocab_size": c.vocab_size,
        "labels": c.labels,
        "regression": c.regression,
        "layers": layers,
        "hf_compatible": compat.hf_compatible,
        "hf_incompatible_reason": compat.reason,
        "loads_in": loads_in(&compat, model.is_quantized(), model.dir.join("model.onnx").is_file()),
        "parameters": model.parameter_count(),
        "on_disk_by_dtype": dtypes,
        "matrices": matrices(model)?,
    }))
}
