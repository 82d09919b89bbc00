//! `axcompress export`: a model for another runtime (ONNX Runtime, stock transformers).

use anyhow::{bail, Result};
use serde_json::{json, Value};

use super::print_json;
use crate::cli::{Cli, ExportArgs, ExportFormat};
use crate::export::onnx::{checked_onnx, LowerOptions};
use crate::export::{
    check_destination, compatibility, loads_in, prepare, prepare_onnx, recorded_history, Prepared,
};
use crate::model::Model;

/// Runs `axcompress export`.
pub fn run(args: &ExportArgs, cli: &Cli) -> Result<()> {
    let model = Model::load(&args.model.model, &args.model.hub(), cli.runtime())?;
    check_destination(&[&model.dir], &args.out, args.force)?;
    let (prepared, notes, opset, verified) = match args.format {
        ExportFormat::Onnx => {
            let options = LowerOptions {
                int8: args.int8,
                int4: args.int4,
            };
            let (onnx, verified) = checked_onnx(&model, options)?;
            (
                prepare_onnx(&model, &onnx)?,
                onnx.notes,
                Some(onnx.opset),
                Some(verified),
            )
        }
        ExportFormat::Transformers => (transformers_dir(&model)?, Vec::new(), None, None),
    };
    prepared.write(&args.out, &[], args.force)?;
    let file = args.out.join(prepared.weights_file());
    let summary = json!({
        "out": args.out,
        "file": file,
        "bytes": prepared.weights.len(),
        "format": match args.format { ExportFormat::Onnx => "onnx", ExportFormat::Transformers => "transformers" },
        "opset": opset,
        "notes": notes,
        "verified": verified,
        "loads_in": match args.format {
            ExportFormat::Onnx => crate::export::onnx::loads_in(opset.unwrap_or_default()),
            ExportFormat::Transformers => loads_in(&compatibility(&model), model.is_quantized(), false),
        },
    });
    if cli.json {
        return print_json(&summary);
    }
    print_summary(&summary);
    Ok(())
}

/// The stock transformers directory, or why the model does not fit one.
fn transformers_dir(model: &Model) -> Result<Prepared> {
    if let Some(why) = compatibility(model).reason {
        bail!("--format transformers: stock transformers 5.x cannot hold this model: {why}; use --format onnx");
    }
    prepare(model, &recorded_history(model))
}

fn print_summary(summary: &Value) {
    println!(
        "wrote {} ({} bytes, {}{})",
        summary["file"].as_str().unwrap_or_default(),
        summary["bytes"],
        summary["format"].as_str().unwrap_or_default(),
        summary["opset"]
            .as_i64()
            .map_or(String::new(), |o| format!(", opset {o}"))
    );
    println!("{}", summary["loads_in"].as_str().unwrap_or_default());
    let v = &summary["verified"];
    if v.is_object() {
        println!(
            "checked: the file run by axcompress's ONNX interpreter on {} synthetic sentences gives logits within {:.2e} of axcompress ({} predictions differ)",
            v["sentences"], v["max_abs_logit_diff"].as_f64().unwrap_or(f64::NAN), v["different_predictions"]
        );
    }
    for note in summary["notes"].as_array().into_iter().flatten() {
        println!("note: {}", note.as_str().unwrap_or_default());
    }
}
