//! `axcompress inspect`: what a model is made of.

use anyhow::Result;
use serde_json::{json, Value};

use super::print_json;
use crate::cli::{Cli, InspectArgs};
use crate::model::Model;

/// Runs `axcompress inspect`.
pub fn run(args: &InspectArgs, cli: &Cli) -> Result<()> {
    let model = Model::load(&args.model.model, args.model.offline)?;
    let report = describe(&model);
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
    println!("layer  heads  ffn    kept heads");
    for (i, l) in c.structure.layers.iter().enumerate() {
        let heads = l
            .heads
            .as_ref()
            .map_or("removed".to_string(), |h| h.len().to_string());
        let ffn = l.ffn_width.map_or("removed".to_string(), |w| w.to_string());
        let kept = l.heads.as_ref().map_or(String::new(), |h| format!("{h:?}"));
        println!("{i:<6} {heads:<6} {ffn:<6} {kept}");
    }
    println!("parameters {}", model.parameter_count());
    for (dtype, (params, bytes)) in &model.disk_dtypes {
        println!("  on disk {dtype}: {params} parameters, {bytes} bytes");
    }
    Ok(())
}

/// The JSON description printed by `inspect --json`.
pub fn describe(model: &Model) -> Value {
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
    json!({
        "dir": model.dir.display().to_string(),
        "family": c.family.name(),
        "hidden_size": c.hidden_size,
        "head_size": c.structure.head_size,
        "original_heads": c.structure.original_heads,
        "vocab_size": c.vocab_size,
        "labels": c.labels,
        "regression": c.regression,
        "layers": layers,
        "parameters": model.parameter_count(),
        "on_disk_by_dtype": dtypes,
    })
}
