//! Quantized matrices in the compressed-tensors convention (the Hugging Face `quant_method:
//! compressed-tensors` format), so that other tools recognise the files:
//!
//! | precision | tensors of module `M`                                          | format           |
//! |-----------|----------------------------------------------------------------|------------------|
//! | int8      | `M.weight` I8 `[out, in]`, `M.weight_scale` F16 `[out, 1]`      | `int-quantized`  |
//! | int4      | `M.weight_packed` I32 `[out, in/8]`, `M.weight_scale` F16 `[out, in/32]`, `M.weight_shape` I64 `[2]` | `pack-quantized` |
//!
//! Values are `code · scale`, symmetric (no zero point). int4 codes are stored as `code + 8`, eight
//! per int32 little end first (entry `i` of a row in bits `4·(i mod 8)` of word `i / 8`), as
//! compressed-tensors' `pack_to_int32` writes them. `config.json` gets a `quantization_config`
//! with one config group per precision, targeting its modules by full name, and the modules left
//! float in `ignore`. Biases, LayerNorms and position / token-type embeddings stay float.

use std::borrow::Cow;
use std::collections::BTreeMap;

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use half::{bf16, f16};
use safetensors::{Dtype, View};
use serde_json::{json, Value};

use crate::formats::quant::{Bits, Codes};
use crate::formats::striped::Striped;

/// A tensor ready to be written: dtype, shape and little-endian bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    /// safetensors dtype.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Bytes.
    pub data: Vec<u8>,
}

impl View for &Stored {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

impl Stored {
    /// A float tensor in `dtype` (f16, bf16, else f32).
    pub fn float(t: &Tensor, dtype: DType) -> Result<Self> {
        let shape = t.dims().to_vec();
        let flat = t.flatten_all()?;
        let (dtype, data) = match dtype {
            DType::F16 => (
                Dtype::F16,
                le(flat.to_dtype(dtype)?.to_vec1::<f16>()?, f16::to_le_bytes),
            ),
            DType::BF16 => (
                Dtype::BF16,
                le(flat.to_dtype(dtype)?.to_vec1::<bf16>()?, bf16::to_le_bytes),
            ),
            _ => (
                Dtype::F32,
                le(
                    flat.to_dtype(DType::F32)?.to_vec1::<f32>()?,
                    f32::to_le_bytes,
                ),
            ),
        };
        Ok(Stored { dtype, shape, data })
    }
}

/// Little-endian bytes of `values`.
fn le<T: Copy, const N: usize>(values: Vec<T>, bytes: fn(T) -> [u8; N]) -> Vec<u8> {
    values.into_iter().flat_map(bytes).collect()
}

/// The tensors of a quantized module `module` (its Hugging Face name).
pub fn quantized_entries(module: &str, codes: &Codes) -> Vec<(String, Stored)> {
    let (rows, cols) = (codes.rows, codes.cols);
    let scale = Stored {
        dtype: Dtype::F16,
        shape: vec![rows, cols / codes.group],
        data: le(codes.scales.clone(), f16::to_le_bytes),
    };
    let mut out = vec![(format!("{module}.weight_scale"), scale)];
    match codes.bits {
        Bits::Int8 => out.push((
            format!("{module}.weight"),
            Stored {
                dtype: Dtype::I8,
                shape: vec![rows, cols],
                data: codes.codes.iter().map(|&q| q as u8).collect(),
            },
        )),
        Bits::Int4 => {
            let words: Vec<u32> = codes
                .codes
                .chunks(8)
                .map(|eight| {
                    eight.iter().enumerate().fold(0u32, |w, (i, &q)| {
                        w | (u32::from((q + 8) as u8 & 0x0f) << (4 * i))
                    })
                })
                .collect();
            out.push((
                format!("{module}.weight_packed"),
                Stored {
                    dtype: Dtype::I32,
                    shape: vec![rows, cols / 8],
                    data: le(words, u32::to_le_bytes),
                },
            ));
            out.push((
                format!("{module}.weight_shape"),
                Stored {
                    dtype: Dtype::I64,
                    shape: vec![2],
                    data: le(vec![rows as i64, cols as i64], i64::to_le_bytes),
                },
            ));
        }
    }
    out
}

/// The tensors of a block-sparse matrix `module` (full name): `M.weight_stripes` (float,
/// `[kept segments, width]`, stripe after stripe), `M.weight_stripe_rows` (I32, the output row
/// of each segment, ascending within a stripe) and `M.weight_stripe_counts` (I32, segments per
/// stripe; its length is the number of stripes).
pub fn striped_entries(module: &str, s: &Striped, dtype: DType) -> Result<Vec<(String, Stored)>> {
    let (counts, rows, values) = s.packed()?;
    let int32 = |v: Vec<i32>| Stored {
        dtype: Dtype::I32,
        shape: vec![v.len()],
        data: le(v, i32::to_le_bytes),
    };
    Ok(vec![
        (
            format!("{module}.weight_stripes"),
            Stored::float(&values, dtype)?,
        ),
        (
            format!("{module}.weight_stripe_rows"),
            int32(rows.iter().map(|&r| r as i32).collect()),
        ),
        (
            format!("{module}.weight_stripe_counts"),
            int32(counts.iter().map(|&c| c as i32).collect()),
        ),
    ])
}

/// Reads the I32 tensor `bytes` of a block-sparse matrix as non-negative integers.
pub fn read_stripe_ints(bytes: &[u8]) -> Option<Vec<u32>> {
    bytes
        .chunks_exact(4)
        .map(|b| u32::try_from(i32::from_le_bytes(b.try_into().ok()?)).ok())
        .collect()
}

/// Reads a quantized module back: `weight` I8 (int8) or `weight_packed` + `weight_shape` (int4 or
/// int8 packed), with `weight_scale` in any float dtype. `None` when `module` has neither.
pub fn read_codes(
    module: &str,
    get: impl Fn(&str) -> Option<(Dtype, Vec<usize>, Vec<u8>)>,
    scales_f32: impl Fn(&str) -> Result<Option<Vec<f32>>>,
) -> Result<Option<Codes>> {
    let (codes, rows, cols, bits) = if let Some((Dtype::I8, shape, data)) =
        get(&format!("{module}.weight"))
    {
        let [rows, cols] = shape[..] else {
            bail!("{module}.weight: expected 2 dimensions, found {shape:?}");
        };
        (
            data.iter().map(|&b| b as i8).collect::<Vec<_>>(),
            rows,
            cols,
            Bits::Int8,
        )
    } else if let Some((_, packed_shape, packed)) = get(&format!("{module}.weight_packed")) {
        let Some((_, _, shape)) = get(&format!("{module}.weight_shape")) else {
            bail!("{module}.weight_shape is missing beside {module}.weight_packed");
        };
        let dims: Vec<usize> = shape
            .chunks(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap_or_default()) as usize)
            .collect();
        let [rows, cols] = dims[..] else {
            bail!("{module}.weight_shape: expected [rows, cols], found {dims:?}");
        };
        let words = packed_shape.iter().product::<usize>();
        let bits = match (words * 32).checked_div(rows * cols) {
            Some(4) => Bits::Int4,
            Some(8) => Bits::Int8,
            _ => bail!("{module}.weight_packed {packed_shape:?} does not hold 4- or 8-bit codes of [{rows}, {cols}]"),
        };
        let n = bits.count();
        let mask = (1u32 << n) - 1;
        let offset = 1i32 << (n - 1);
        let codes = packed
            .chunks(4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap_or_default()))
            .flat_map(|w| (0..32 / n).map(move |i| ((w >> (n * i)) & mask) as i32 - offset))
            .map(|q| q as i8)
            .collect();
        (codes, rows, cols, bits)
    } else {
        return Ok(None);
    };
    let Some(scales) = scales_f32(&format!("{module}.weight_scale"))? else {
        bail!("{module}.weight_scale is missing");
    };
    if scales.is_empty()
        || (rows * cols) % scales.len() != 0
        || cols % ((rows * cols) / scales.len()) != 0
    {
        bail!("{module}.weight_scale has {} entries, which do not divide [{rows}, {cols}] into groups", scales.len());
    }
    let group = rows * cols / scales.len();
    if group % 32 != 0 {
        bail!("{module}: groups of {group} are not supported (a multiple of 32 is needed)");
    }
    Ok(Some(Codes {
        bits,
        rows,
        cols,
        group,
        codes,
        scales: scales.into_iter().map(f16::from_f32).collect(),
    }))
}

/// The zero points of a quantized module (`weight_zero_point`, asymmetric weights), one per
/// scale in the scales' order, from the stored tensor: int8 (or int32) values one per scale
/// (`int-quantized`), or codes packed into int32 words along the output rows (`pack-quantized`:
/// `[ceil(rows · bits / 32), groups]`, each value offset by `2^(bits−1)`).
pub fn read_zero_points(
    module: &str,
    codes: &Codes,
    (dtype, shape, bytes): (Dtype, Vec<usize>, Vec<u8>),
) -> Result<Vec<i32>> {
    let groups = codes.cols / codes.group;
    let count = codes.rows * groups;
    let n = codes.bits.count();
    let words_per_group = (codes.rows * n).div_ceil(32);
    let ints: Vec<i32> = match dtype {
        Dtype::I8 => bytes.iter().map(|&b| i32::from(b as i8)).collect(),
        Dtype::I32 => bytes
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes(b.try_into().expect("4 bytes")))
            .collect(),
        other => bail!(
            "{module}.weight_zero_point is {other:?}; int8 or int32 zero points are supported"
        ),
    };
    if ints.len() == count {
        return Ok(ints);
    }
    if dtype == Dtype::I32 && ints.len() == words_per_group * groups {
        let (mask, offset) = ((1u32 << n) - 1, 1i32 << (n - 1));
        // Stored [words, groups]: the zero point of row r, group g is in word (r·n/32, g).
        return Ok((0..codes.rows)
            .flat_map(|r| {
                let ints = &ints;
                (0..groups).map(move |g| {
                    let word = ints[(r * n / 32) * groups + g] as u32;
                    ((word >> ((r * n) % 32)) & mask) as i32 - offset
                })
            })
            .collect());
    }
    bail!(
        "{module}.weight_zero_point {shape:?} holds neither one zero point per scale ({count}) nor them packed along the rows; export the model again"
    )
}

/// The values `(code − zero point) · scale` of a module with zero points, row-major, with the
/// scales as stored (`scales`, one per group: not rounded to the f16 of [`Codes`]).
pub fn dequantize_with_zero_points(codes: &Codes, zero_points: &[i32], scales: &[f32]) -> Vec<f32> {
    codes
        .codes
        .chunks(codes.group)
        .zip(scales.iter().zip(zero_points))
        .flat_map(|(group, (&s, &zp))| group.iter().map(move |&q| (i32::from(q) - zp) as f32 * s))
        .collect()
}

/// The `quantization_config` of `config.json`: one config group per precision, targeting its
/// modules by full name; the modules left float in `ignore`.
pub fn quantization_config(modules: &BTreeMap<Bits, Vec<String>>, ignore: &[String]) -> Value {
    let mut groups = serde_json::Map::new();
    let mut formats = Vec::new();
    for (i, (bits, names)) in modules.iter().enumerate() {
        let (format, strategy, group_size) = match bits {
            Bits::Int8 => ("int-quantized", "channel", Value::Null),
            Bits::Int4 => ("pack-quantized", "group", json!(32)),
        };
        formats.push(format);
        groups.insert(
            format!("group_{i}"),
            json!({
                "targets": names,
                "format": format,
                "weights": {
                    "num_bits": bits.count(),
                    "type": "int",
                    "symmetric": true,
                    "strategy": strategy,
                    "group_size": group_size,
                    "dynamic": false,
                },
                "input_activations": null,
                "output_activations": null,
            }),
        );
    }
    let format = match formats[..] {
        [one] => one,
        _ => "mixed-precision",
    };
    json!({
        "quant_method": "compressed-tensors",
        "format": format,
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": ignore,
        "kv_cache_scheme": null,
        "sparsity_config": {},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn codes(bits: Bits, values: Vec<i8>, rows: usize, cols: usize) -> Codes {
        let group = bits.group(cols);
        Codes {
            bits,
            rows,
            cols,
            group,
            scales: (0..rows * cols / group)
                .map(|i| f16::from_f32(0.5 + i as f32))
                .collect(),
            codes: values,
        }
    }

    fn lookup(
        entries: &[(String, Stored)],
    ) -> impl Fn(&str) -> Option<(Dtype, Vec<usize>, Vec<u8>)> + '_ {
        |name| {
            entries
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, s)| (s.dtype, s.shape.clone(), s.data.clone()))
        }
    }

    #[test]
    fn int4_packs_like_compressed_tensors_pack_to_int32() {
        // compressed-tensors 0.20 packs [-5, 1, 3, 1, -1, -3, -1, 2] into 0xa7579b93.
        let mut values = vec![-5, 1, 3, 1, -1, -3, -1, 2];
        values.resize(32, 0);
        let entries = quantized_entries("m", &codes(Bits::Int4, values, 1, 32));
        let (_, packed) = entries
            .iter()
            .find(|(n, _)| n == "m.weight_packed")
            .unwrap();
        assert_eq!(packed.shape, vec![1, 4]);
        assert_eq!(packed.data[..4], 0xa757_9b93u32.to_le_bytes());
    }

    #[test]
    fn written_codes_read_back_unchanged() {
        for bits in [Bits::Int8, Bits::Int4] {
            let (low, high) = match bits {
                Bits::Int8 => (-128, 127),
                Bits::Int4 => (-8, 7),
            };
            let values: Vec<i8> = (0..2 * 64)
                .map(|i| (low + (i * 5) % (high - low + 1)) as i8)
                .collect();
            let original = codes(bits, values, 2, 64);
            let entries = quantized_entries("m", &original);
            let scales = |name: &str| -> Result<Option<Vec<f32>>> {
                Ok(lookup(&entries)(name).map(|(_, _, d)| {
                    d.chunks(2)
                        .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                        .collect()
                }))
            };
            let back = read_codes("m", lookup(&entries), scales).unwrap().unwrap();
            assert_eq!(back, original, "{bits:?}");
        }
    }

    #[test]
    fn the_config_names_every_module_once() {
        let modules = BTreeMap::from([
            (Bits::Int8, vec!["a".to_string()]),
            (Bits::Int4, vec!["b".to_string()]),
        ]);
        let c = quantization_config(&modules, &["c".to_string()]);
        assert_eq!(c["format"], "mixed-precision");
        assert_eq!(c["config_groups"]["group_0"]["weights"]["num_bits"], 8);
        assert_eq!(
            c["config_groups"]["group_0"]["weights"]["strategy"],
            "channel"
        );
        assert_eq!(c["config_groups"]["group_1"]["targets"], json!(["b"]));
        assert_eq!(c["ignore"], json!(["c"]));
    }

    #[test]
    fn packed_zero_points_read_as_compressed_tensors_packs_them() {
        // compressed_tensors 0.20.1: pack_to_int32(zp, 4, packed_dim=0) of a [10, 2] int8
        // tensor with zp[r][g] = ((r + 3g) mod 16) − 8 gave these words, stored [2, 2].
        let words: [i32; 4] = [1985229328, -1450744509, 152, 203];
        let bytes = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        let c = codes(Bits::Int4, vec![0; 10 * 64], 10, 64);
        let zp = read_zero_points("m", &c, (Dtype::I32, vec![2, 2], bytes)).unwrap();
        let expected: Vec<i32> = (0..10)
            .flat_map(|r| (0..2).map(move |g| ((r + 3 * g) % 16) - 8))
            .collect();
        assert_eq!(zp, expected);
    }

    #[test]
    fn zero_points_shift_the_codes() {
        let mut c = codes(Bits::Int8, vec![5; 64], 1, 64);
        c.scales = vec![f16::from_f32(0.5)];
        let values = dequantize_with_zero_points(&c, &[3], &[0.5]);
        assert!(values.iter().all(|&v| v == 1.0));
        let unpacked = read_zero_points("m", &c, (Dtype::I8, vec![1, 1], vec![3])).unwrap();
        assert_eq!(unpacked, vec![3]);
        let err = read_zero_points("m", &c, (Dtype::I8, vec![2, 1], vec![3, 3])).unwrap_err();
        assert!(
            err.to_string().contains("weight_zero_point [2, 1]"),
            "{err}"
        );
    }
}
