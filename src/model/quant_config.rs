//! The `quantization_config` of a checkpoint's `config.json`, checked against what axcompress
//! executes: integer weights (compressed-tensors `int-quantized` int8 per channel, or
//! `pack-quantized` int4 in groups of a multiple of 32; asymmetric ones are read with their zero
//! points and dequantized), no activation quantization. Every field
//! that would change how the stored codes are read is either honoured or refused in one line
//! naming it, so that a checkpoint quantized another way never loads as wrong numbers.

use anyhow::{bail, Result};
use serde_json::Value;

use super::weights::StoredQuantized;
use crate::formats::quant::Bits;

/// What one config group declares about its weights.
#[derive(Debug, Clone, PartialEq)]
struct Declared {
    bits: Bits,
    /// Entries per scale; `None` for one scale per output channel.
    group_size: Option<usize>,
}

/// Checks `config.json`'s `quantization_config` (`file` names config.json in messages) and that
/// every quantized module the weights hold matches one of its groups.
pub fn check(raw: &Value, file: &str, stored: &[StoredQuantized]) -> Result<()> {
    let Some(q) = raw.get("quantization_config").filter(|q| !q.is_null()) else {
        return Ok(());
    };
    let declared = declared_groups(q, file)?;
    for m in stored {
        let matches = |d: &Declared| {
            d.bits == m.bits
                && match d.group_size {
                    None => m.group == m.cols,
                    Some(g) => g == m.group,
                }
        };
        if !declared.iter().any(matches) {
            bail!(
                "{file}: {} is stored as {}-bit codes with {} entries per scale, which no quantization_config group declares (num_bits, strategy, group_size); export the model again",
                m.module,
                m.bits.count(),
                m.group
            );
        }
    }
    Ok(())
}

/// The groups of a compressed-tensors config, each field checked.
fn declared_groups(q: &Value, file: &str) -> Result<Vec<Declared>> {
    let field = |name: &str| format!("{file}: quantization_config.{name}");
    let method = q.get("quant_method").and_then(Value::as_str).unwrap_or("");
    if method != "compressed-tensors" {
        bail!(
            "{} is {}; axcompress reads only compressed-tensors int8/int4 weights: pass the float model",
            field("quant_method"),
            q.get("quant_method").unwrap_or(&Value::Null)
        );
    }
    const FORMATS: [&str; 3] = ["int-quantized", "pack-quantized", "mixed-precision"];
    check_one_of(q, "format", &FORMATS, &field("format"))?;
    refuse_set(
        q,
        "kv_cache_scheme",
        &field("kv_cache_scheme"),
        "is not supported",
    )?;
    let Some(groups) = q.get("config_groups").and_then(Value::as_object) else {
        bail!(
            "{} is missing or not an object; export the model again",
            field("config_groups")
        );
    };
    groups
        .iter()
        .map(|(name, group)| declared(group, &field(&format!("config_groups.{name}"))))
        .collect()
}

/// One config group's weights, each field honoured or refused.
fn declared(group: &Value, at: &str) -> Result<Declared> {
    check_one_of(
        group,
        "format",
        &["int-quantized", "pack-quantized"],
        &format!("{at}.format"),
    )?;
    for name in ["input_activations", "output_activations"] {
        refuse_set(
            group,
            name,
            &format!("{at}.{name}"),
            "is not supported: axcompress quantizes weights only",
        )?;
    }
    let Some(w) = group.get("weights").filter(|w| w.is_object()) else {
        bail!("{at}.weights is missing or not an object; export the model again");
    };
    let at = format!("{at}.weights");
    let bits = match w.get("num_bits").and_then(Value::as_u64) {
        Some(8) => Bits::Int8,
        Some(4) => Bits::Int4,
        _ => bail!(
            "{at}.num_bits is {}; only 8 and 4 are supported",
            w.get("num_bits").unwrap_or(&Value::Null)
        ),
    };
    check_one_of(w, "type", &["int"], &format!("{at}.type"))?;
    // Asymmetric weights (`symmetric: false`) are read with their `weight_zero_point`.
    if w.get("dynamic").is_some_and(|d| d != &Value::Bool(false)) {
        bail!(
            "{at}.dynamic is {}: only static weight scales are supported",
            w["dynamic"]
        );
    }
    for name in ["actorder", "block_structure"] {
        refuse_set(w, name, &format!("{at}.{name}"), "is not supported")?;
    }
    let strategy = w.get("strategy").and_then(Value::as_str).unwrap_or("");
    let group_size = match strategy {
        "channel" => None,
        "group" => Some(group_size(w, &at)?),
        _ => bail!(
            "{at}.strategy is {}; only \"channel\" and \"group\" are supported",
            w.get("strategy").unwrap_or(&Value::Null)
        ),
    };
    Ok(Declared { bits, group_size })
}

/// A group strategy's `group_size`: a positive multiple of 32.
fn group_size(w: &Value, at: &str) -> Result<usize> {
    match w.get("group_size").and_then(Value::as_u64) {
        Some(g) if g > 0 && g % 32 == 0 => Ok(g as usize),
        _ => bail!(
            "{at}.group_size is {}; groups of a positive multiple of 32 are supported",
            w.get("group_size").unwrap_or(&Value::Null)
        ),
    }
}

/// Refuses `obj[name]` unless it is absent or one of `allowed`.
fn check_one_of(obj: &Value, name: &str, allowed: &[&str], at: &str) -> Result<()> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(()),
        Some(Value::String(s)) if allowed.contains(&s.as_str()) => Ok(()),
        Some(other) => bail!("{at} is {other}; supported: {}", allowed.join(", ")),
    }
}

/// Refuses `obj[name]` unless it is absent, null or empty.
fn refuse_set(obj: &Value, name: &str, at: &str, why: &str) -> Result<()> {
    let empty = match obj.get(name) {
        None | Some(Value::Null) => true,
        Some(Value::Object(m)) => m.is_empty(),
        Some(Value::Bool(b)) => !b,
        _ => false,
    };
    if !empty {
        bail!("{at} is {} and {why}", obj[name]);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn config(weights: Value) -> Value {
        json!({"quantization_config": {
            "quant_method": "compressed-tensors",
            "format": "int-quantized",
            "config_groups": {"group_0": {
                "targets": ["m"], "format": "int-quantized", "weights": weights,
                "input_activations": null, "output_activations": null
            }},
            "kv_cache_scheme": null, "sparsity_config": {}
        }})
    }

    fn int8() -> Value {
        json!({"num_bits": 8, "type": "int", "symmetric": true, "strategy": "channel",
               "group_size": null, "dynamic": false, "actorder": null, "observer": "minmax"})
    }

    fn stored(bits: Bits, cols: usize, group: usize) -> StoredQuantized {
        StoredQuantized {
            module: "m".into(),
            bits,
            cols,
            group,
        }
    }

    #[test]
    fn what_axcompress_writes_is_accepted() {
        check(&config(int8()), "c", &[stored(Bits::Int8, 64, 64)]).unwrap();
        let mut int4 = int8();
        int4["num_bits"] = json!(4);
        int4["strategy"] = json!("group");
        int4["group_size"] = json!(32);
        check(&config(int4), "c", &[stored(Bits::Int4, 64, 32)]).unwrap();
        check(&json!({}), "c", &[stored(Bits::Int8, 64, 64)]).unwrap();
        // Asymmetric weights are read with their zero points.
        let mut asymmetric = int8();
        asymmetric["symmetric"] = json!(false);
        check(&config(asymmetric), "c", &[stored(Bits::Int8, 64, 64)]).unwrap();
    }

    #[test]
    fn each_unsupported_field_is_named() {
        let cases: [(&str, Value, &str); 6] = [
            ("num_bits", json!(3), "weights.num_bits is 3"),
            ("type", json!("float"), "weights.type is \"float\""),
            (
                "strategy",
                json!("tensor"),
                "weights.strategy is \"tensor\"",
            ),
            ("dynamic", json!(true), "weights.dynamic is true"),
            ("actorder", json!("group"), "weights.actorder is \"group\""),
            ("block_structure", json!([2, 2]), "weights.block_structure"),
        ];
        for (name, value, expected) in cases {
            let mut w = int8();
            w[name] = value;
            let err = check(&config(w), "c", &[]).unwrap_err().to_string();
            assert!(
                err.starts_with("c: quantization_config.config_groups.group_0."),
                "{err}"
            );
            assert!(err.contains(expected), "{name}: {err}");
        }
        let mut w = int8();
        w["strategy"] = json!("group");
        w["group_size"] = json!(0);
        let err = check(&config(w), "c", &[]).unwrap_err().to_string();
        assert!(err.contains("group_size is 0"), "{err}");
    }

    #[test]
    fn other_methods_and_activation_quantization_are_refused() {
        let mut c = config(int8());
        c["quantization_config"]["quant_method"] = json!("gptq");
        let err = check(&c, "c", &[]).unwrap_err().to_string();
        assert!(err.contains("quant_method is \"gptq\""), "{err}");
        let mut c = config(int8());
        c["quantization_config"]["config_groups"]["group_0"]["input_activations"] =
            json!({"num_bits": 8});
        let err = check(&c, "c", &[]).unwrap_err().to_string();
        assert!(err.contains("input_activations"), "{err}");
    }

    #[test]
    fn stored_codes_must_match_a_declared_group() {
        let err = check(&config(int8()), "c", &[stored(Bits::Int4, 64, 32)])
            .unwrap_err()
            .to_string();
        assert!(err.contains("c: m is stored as 4-bit codes"), "{err}");
        let err = check(&config(int8()), "c", &[stored(Bits::Int8, 64, 32)]).unwrap_err();
        assert!(err.to_string().contains("32 entries per scale"), "{err}");
    }
}
