//! Group-wise symmetric integer quantization of a weight matrix, and running it quantized.
//!
//! A matrix `[rows, cols]` is cut into groups of consecutive entries along a row (the input
//! dimension of a linear layer); each group has one fp16 scale `s` and integer codes `q`, and
//! stands for `q · s`. int4 uses groups of [`GROUP`] entries, codes in `-8..=7`; int8 uses one
//! group per row (a per-channel scale), codes in `-128..=127`: 32-entry groups would cost int8
//! 0.5 bit per weight more, 6 % of its size, for precision it does not need. The scale maps the
//! group's largest magnitude exactly onto the end of the range on its own side (`-8` for a
//! negative extreme, `+7` for a positive one at 4 bits), so no code is ever clamped.
//!
//! int8 and int4 codes run in axcompress's own kernels ([`crate::kernels::int8_gemm`],
//! [`crate::kernels::int4_gemm`]: AVX2 `vpmaddubsw`, or AVX-512 VNNI, with the activations rounded
//! to 7 bits per row); both beat candle's f32 product at MiniLM's shapes
//! (`docs/commands/quantize.md`). The codes also map onto candle's (ggml's) `Q8_0` and `Q4_0`
//! blocks: 32 values along the inner dimension with one fp16 scale, `Q8_0` holding the codes as
//! `i8` and `Q4_0` holding `code + 8` as nibbles (entry `j` in the low nibble of byte `j`, entry
//! `j + 16` in the high one). A row scale is repeated in each of the row's blocks, so a matrix
//! becomes a `QTensor` without rounding again; candle's kernels run on request
//! (`--execution candle`), slower than its f32 product here.
//!
//! candle-transformers' `quantized_nn::Linear` and `quantized_var_builder` are not used: they
//! load GGUF files and quantize with ggml's own rounding, while our codes come from
//! compressed-tensors safetensors or from this module, and a layer must also be able to run the
//! dequantized matrix instead (see [`Execution`]).

use rayon::prelude::*;
use std::borrow::Cow;
use std::sync::{Arc, OnceLock};

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{bail, Device, Module, Result, Storage, Tensor};

use crate::kernels::int4_gemm::{self, PackedInt4};
use crate::kernels::int8_gemm::PackedInt8;
use crate::kernels::row_quant::{self, PackedWeights};
use half::f16;
use serde::{Deserialize, Serialize};

/// Entries per quantization group (along the input dimension), each with one fp16 scale.
pub const GROUP: usize = 32;
const _: () = assert!(
    GROUP == int4_gemm::GROUP,
    "the int4 kernel packs the same groups"
);

/// An integer precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Bits {
    /// 8-bit codes, `-128..=127`.
    Int8,
    /// 4-bit codes, `-8..=7`.
    Int4,
}

impl Bits {
    /// Number of bits per code.
    pub fn count(self) -> usize {
        match self {
            Bits::Int8 => 8,
            Bits::Int4 => 4,
        }
    }

    /// The candle block type holding these codes.
    fn ggml(self) -> GgmlDType {
        match self {
            Bits::Int8 => GgmlDType::Q8_0,
            Bits::Int4 => GgmlDType::Q4_0,
        }
    }

    /// Entries sharing one scale in a matrix with `cols` columns: a row at int8, [`GROUP`] at
    /// int4.
    pub fn group(self, cols: usize) -> usize {
        match self {
            Bits::Int8 => cols,
            Bits::Int4 => GROUP,
        }
    }

    /// Smallest and largest code.
    fn range(self) -> (i32, i32) {
        let half = 1i32 << (self.count() - 1);
        (-half, half - 1)
    }

    /// Bytes a `[rows, cols]` matrix takes on disk: codes plus one fp16 scale per group.
    pub fn stored_bytes(self, rows: usize, cols: usize) -> usize {
        rows * cols * self.count() / 8 + rows * (cols / self.group(cols)) * 2
    }
}

/// The precision of a weight matrix as reports and `inspect` show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// A float matrix (the checkpoint's dtype on disk, f32 at run time).
    Float,
    /// int8 codes.
    Int8,
    /// int4 codes.
    Int4,
    /// Parts with different precisions (a fused projection).
    Mixed,
}

impl Precision {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Precision::Float => "float",
            Precision::Int8 => "int8",
            Precision::Int4 => "int4",
            Precision::Mixed => "mixed",
        }
    }
}

impl From<Bits> for Precision {
    fn from(bits: Bits) -> Self {
        match bits {
            Bits::Int8 => Precision::Int8,
            Bits::Int4 => Precision::Int4,
        }
    }
}

/// Why a matrix cannot be quantized group-wise, if it cannot.
pub fn unquantizable(cols: usize) -> Option<String> {
    (!cols.is_multiple_of(GROUP) || cols == 0).then(|| {
        format!("input dimension {cols} is not a positive multiple of the group size {GROUP}")
    })
}

/// Why the values of a row-major matrix with `cols` columns cannot be quantized to `bits` with
/// fp16 scales, if they cannot: a group whose largest magnitude needs a scale beyond fp16's
/// range (above 65504), or one so small that its scale rounds to zero while the group is not
/// zero. Such a matrix stays float.
pub fn scale_out_of_range(values: &[f32], cols: usize, bits: Bits) -> Option<String> {
    let (low, high) = bits.range();
    let size = bits.group(cols).max(1);
    values.chunks(size).find_map(|group| {
        let extreme = group.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = extreme / high.max(-low) as f32;
        let stored = f16::from_f32(extreme / high as f32);
        if stored.is_infinite() || !scale.is_finite() {
            Some(format!(
                "weights reach {extreme:e}, whose {} scale overflows fp16 (at most 65504)",
                Precision::from(bits).name()
            ))
        } else if extreme > 0.0 && f16::from_f32(scale).to_f32() == 0.0 {
            Some(format!(
                "a group's weights are at most {extreme:e}, whose {} scale rounds to 0 in fp16",
                Precision::from(bits).name()
            ))
        } else {
            None
        }
    })
}

/// The value of larger magnitude, the positive one on a tie: a group whose extremes are `±e` then
/// maps `e` onto the positive end (`+7` at 4 bits) and `−e` inside the range, where the negative
/// one would put `e` one step beyond it. It also makes quantization idempotent: dequantized codes
/// quantize to the same codes and scales (quantization-aware training relies on it).
fn extreme_of_two(m: f32, v: f32) -> f32 {
    if v.abs() > m.abs() || (v.abs() == m.abs() && v > m) {
        v
    } else {
        m
    }
}

/// The code of `v` at scale `s`: rounded to nearest and clamped to the range.
fn code(v: f32, s: f32, (low, high): (i32, i32)) -> i8 {
    let q = if s > 0.0 { (v / s).round() as i32 } else { 0 };
    q.clamp(low, high) as i8
}

/// Clipping candidates tried below a group's full-range scale at 4 bits: `1 − i/100` for `i` in
/// `1..=CLIP_STEPS`.
const CLIP_STEPS: usize = 20;

/// The fp16 scale of a 4-bit group with the least squared rounding error: the full-range scale
/// (the group's extreme on the end code) or one of [`CLIP_STEPS`] smaller ones, which clamp the
/// few largest weights to round the many small ones finer. The full-range scale wins ties, so a
/// group of dequantized codes keeps its scale (quantization stays idempotent).
fn clipped_scale(group: &[f32], full: f32, range: (i32, i32)) -> f16 {
    let scales: [f16; CLIP_STEPS + 1] =
        std::array::from_fn(|i| f16::from_f32(full * (1.0 - i as f32 / 100.0)));
    // Every candidate's error in one pass over the group: independent sums, each in the group's
    // order (this runs on every quantization-aware training step).
    let candidates = scales.map(f16::to_f32);
    let mut errors = [0f64; CLIP_STEPS + 1];
    for &v in group {
        for (e, &s) in errors.iter_mut().zip(&candidates) {
            *e += f64::from(v - f32::from(code(v, s, range)) * s).powi(2);
        }
    }
    let best = (1..=CLIP_STEPS).fold(0, |b, i| if errors[i] < errors[b] { i } else { b });
    scales[best]
}

/// The full-range scale of a group: its largest weight (the positive one on a tie) on the end
/// code of its sign.
fn full_range_scale(group: &[f32], (low, high): (i32, i32)) -> f32 {
    let extreme = group.iter().copied().fold(0f32, extreme_of_two);
    let steps = if extreme < 0.0 { -low } else { high };
    extreme.abs() / steps as f32
}

/// Integer codes and per-group scales of a `[rows, cols]` matrix, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Codes {
    /// Precision.
    pub bits: Bits,
    /// Rows (outputs).
    pub rows: usize,
    /// Columns (inputs); a multiple of [`GROUP`].
    pub cols: usize,
    /// Entries per scale along a row ([`Bits::group`]).
    pub group: usize,
    /// One code per entry, row-major.
    pub codes: Vec<i8>,
    /// One scale per group, row-major (`rows × cols / group`).
    pub scales: Vec<f16>,
}

impl Codes {
    /// Quantizes a row-major `[rows, cols]` matrix.
    pub fn quantize(values: &[f32], rows: usize, cols: usize, bits: Bits) -> Result<Self> {
        if let Some(why) = unquantizable(cols) {
            bail!("cannot quantize a [{rows}, {cols}] matrix: {why}");
        }
        if let Some(why) = scale_out_of_range(values, cols, bits) {
            bail!("cannot quantize a [{rows}, {cols}] matrix: {why}");
        }
        let (low, high) = bits.range();
        let size = bits.group(cols);
        // Each group's scale and codes in one parallel task (the int4 search runs on every
        // quantization-aware training step); groups are independent, so the result does not
        // depend on the threads.
        let mut codes = vec![0i8; values.len()];
        let scales: Vec<f16> = values
            .par_chunks(size)
            .zip(codes.par_chunks_mut(size))
            .map(|(group, out)| {
                let full = full_range_scale(group, (low, high));
                let scale = match bits {
                    Bits::Int8 => f16::from_f32(full),
                    Bits::Int4 => clipped_scale(group, full, (low, high)),
                };
                let s = scale.to_f32();
                for (q, &v) in out.iter_mut().zip(group) {
                    *q = code(v, s, (low, high));
                }
                scale
            })
            .collect();
        Ok(Codes {
            bits,
            rows,
            cols,
            group: size,
            codes,
            scales,
        })
    }

    /// Bytes on disk: the codes at their width and an fp16 scale per group.
    pub fn stored_bytes(&self) -> usize {
        self.codes.len() * self.bits.count() / 8 + self.scales.len() * 2
    }

    /// Quantizes a 2-D tensor.
    pub fn from_tensor(t: &Tensor, bits: Bits) -> Result<Self> {
        let (rows, cols) = t.dims2()?;
        let values = t.flatten_all()?.to_vec1::<f32>()?;
        Self::quantize(&values, rows, cols, bits)
    }

    /// The values the codes stand for, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        self.codes
            .chunks(self.group)
            .zip(&self.scales)
            .flat_map(|(group, s)| group.iter().map(move |&q| f32::from(q) * s.to_f32()))
            .collect()
    }

    /// The rows of `parts` (same precision, columns and group) stacked in order.
    pub fn stack(parts: &[&Codes]) -> Result<Codes> {
        let Some(first) = parts.first() else {
            bail!("nothing to stack");
        };
        if parts
            .iter()
            .any(|p| (p.bits, p.cols, p.group) != (first.bits, first.cols, first.group))
        {
            bail!("stacked codes differ in precision, columns or group");
        }
        Ok(Codes {
            bits: first.bits,
            rows: parts.iter().map(|p| p.rows).sum(),
            cols: first.cols,
            group: first.group,
            codes: parts.iter().flat_map(|p| p.codes.iter().copied()).collect(),
            scales: parts
                .iter()
                .flat_map(|p| p.scales.iter().copied())
                .collect(),
        })
    }

    /// The codes packed for the int8 kernel (int8 has one scale per row).
    fn pack_int8(&self) -> PackedInt8 {
        let scales: Vec<f32> = self.scales.iter().map(|s| s.to_f32()).collect();
        PackedInt8::pack(&self.codes, &scales, self.rows, self.cols)
    }

    /// The codes packed for the int4 kernel (one scale per row and group of [`GROUP`]).
    fn pack_int4(&self) -> PackedInt4 {
        let scales: Vec<f32> = self.scales.iter().map(|s| s.to_f32()).collect();
        PackedInt4::pack(&self.codes, &scales, self.rows, self.cols)
    }

    /// The codes in candle's block layout (`Q8_0` or `Q4_0`), each block carrying its group's
    /// scale.
    pub fn to_blocks(&self) -> Vec<u8> {
        let blocks = self.codes.len() / GROUP;
        let mut out = Vec::with_capacity(blocks * (2 + GROUP * self.bits.count() / 8));
        for (b, group) in self.codes.chunks(GROUP).enumerate() {
            out.extend(self.scales[b * GROUP / self.group].to_le_bytes());
            match self.bits {
                Bits::Int8 => out.extend(group.iter().map(|&q| q as u8)),
                Bits::Int4 => {
                    let (low, high) = group.split_at(GROUP / 2);
                    out.extend(
                        low.iter()
                            .zip(high)
                            .map(|(&a, &b)| nibble(a) | nibble(b) << 4),
                    );
                }
            }
        }
        out
    }

    /// Only the rows at `idx`, in that order.
    pub fn select_rows(&self, idx: &[usize]) -> Codes {
        let groups = self.cols / self.group;
        Codes {
            bits: self.bits,
            rows: idx.len(),
            cols: self.cols,
            group: self.group,
            codes: idx
                .iter()
                .flat_map(|&r| &self.codes[r * self.cols..(r + 1) * self.cols])
                .copied()
                .collect(),
            scales: idx
                .iter()
                .flat_map(|&r| &self.scales[r * groups..(r + 1) * groups])
                .copied()
                .collect(),
        }
    }
}

/// A 4-bit code as the unsigned nibble `Q4_0` stores.
fn nibble(q: i8) -> u8 {
    (q + 8) as u8 & 0x0f
}

/// How a quantized matrix is multiplied.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Execution {
    /// The fastest measured per precision: each in axcompress's own kernel.
    #[default]
    Auto,
    /// axcompress's quantized kernels: int8 in the int8 kernel, int4 in the int4 kernel
    /// (activations rounded to 7 bits per row in both).
    Kernel,
    /// candle's `Q8_0` / `Q4_0` kernels for both precisions (for comparison: slower here).
    Candle,
    /// The matrix dequantized to f32 once, multiplied densely.
    Dequantized,
}

impl Execution {
    /// What a matrix runs as: `Kernel`, `Candle` or `Dequantized`. Auto picks by measurement
    /// (`cargo bench --bench kernels`): both kernels beat candle's f32 product at MiniLM's
    /// shapes, while candle 0.11's `Q4_0` and `Q8_0` kernels were 2.2–10× slower than it.
    pub fn resolved(self) -> Execution {
        match self {
            Execution::Auto => Execution::Kernel,
            other => other,
        }
    }
}

/// A quantized weight matrix `[rows, cols]`, ready to multiply.
#[derive(Debug, Clone)]
pub struct QuantMatrix {
    /// The codes and scales (what export writes).
    pub codes: Arc<Codes>,
    /// How it runs: `Kernel` (the int8 kernel), `Candle` or `Dequantized`.
    pub execution: Execution,
    kernel: Kernel,
}

#[derive(Debug, Clone)]
enum Kernel {
    /// Packed for the int8 kernel on first use (an embedding matrix is only looked up), shared
    /// by every clone.
    Int8(Arc<OnceLock<PackedInt8>>),
    /// Packed for the int4 kernel on first use, likewise.
    Int4(Arc<OnceLock<PackedInt4>>),
    Candle(QMatMul, Arc<QTensor>),
    Dense(Tensor),
}

impl QuantMatrix {
    /// Builds the runnable matrix from its codes, executed as `execution` says.
    pub fn with_execution(codes: Codes, execution: Execution) -> Result<Self> {
        let execution = execution.resolved();
        let kernel = match execution {
            Execution::Kernel if codes.bits == Bits::Int8 => Kernel::Int8(Arc::default()),
            Execution::Kernel => Kernel::Int4(Arc::default()),
            Execution::Candle => {
                let q = Arc::new(to_qtensor(&codes)?);
                Kernel::Candle(QMatMul::from_arc(q.clone())?, q)
            }
            _ => Kernel::Dense(Tensor::from_vec(
                codes.dequantize(),
                (codes.rows, codes.cols),
                &Device::Cpu,
            )?),
        };
        Ok(QuantMatrix {
            codes: Arc::new(codes),
            execution,
            kernel,
        })
    }

    /// Quantizes a dense `[rows, cols]` tensor, executed as `execution` says.
    pub fn quantize(t: &Tensor, bits: Bits, execution: Execution) -> Result<Self> {
        Self::with_execution(Codes::from_tensor(t, bits)?, execution)
    }

    /// `(rows, cols)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.codes.rows, self.codes.cols)
    }

    /// How it runs, in words (`inspect`).
    pub fn runs_as(&self) -> &'static str {
        match (&self.kernel, self.bits()) {
            (Kernel::Int8(_), _) => "int8 kernel (activations rounded to 7 bits per row)",
            (Kernel::Int4(_), _) => "int4 kernel (activations rounded to 7 bits per row)",
            (Kernel::Candle(..), Bits::Int8) => "candle Q8_0 kernel",
            (Kernel::Candle(..), Bits::Int4) => "candle Q4_0 kernel",
            (Kernel::Dense(_), _) => "dequantized to f32 once",
        }
    }

    /// Precision.
    pub fn bits(&self) -> Bits {
        self.codes.bits
    }

    /// The dequantized matrix, f32 `[rows, cols]`.
    pub fn dequantize(&self) -> Result<Tensor> {
        match &self.kernel {
            Kernel::Dense(t) => Ok(t.clone()),
            Kernel::Candle(_, q) => q.dequantize(&Device::Cpu),
            Kernel::Int8(_) | Kernel::Int4(_) => self.codes_tensor(),
        }
    }

    fn codes_tensor(&self) -> Result<Tensor> {
        let (rows, cols) = self.dims();
        Tensor::from_vec(self.codes.dequantize(), (rows, cols), &Device::Cpu)
    }

    /// `x Mᵀ` for `x` of shape `[n, cols]`.
    pub fn matmul_t(&self, x: &Tensor) -> Result<Tensor> {
        self.product(x, None)
    }

    /// `x Mᵀ + bias`; the int8 kernel adds the bias in its last step (the same float additions
    /// as adding it afterwards, without another pass over the output).
    pub fn matmul_t_bias(&self, x: &Tensor, bias: &Tensor) -> Result<Tensor> {
        self.product(x, Some(bias))
    }

    fn product(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let out = match &self.kernel {
            Kernel::Int8(packed) => {
                return packed_product(x, bias, packed.get_or_init(|| self.codes.pack_int8()));
            }
            Kernel::Int4(packed) => {
                return packed_product(x, bias, packed.get_or_init(|| self.codes.pack_int4()));
            }
            Kernel::Candle(m, _) => m.forward(&x.contiguous()?)?,
            Kernel::Dense(t) => x.matmul(&t.t()?)?,
        };
        Ok(match bias {
            Some(b) => out.broadcast_add(b)?,
            None => out,
        })
    }

    /// The rows at `ids` (an embedding lookup), f32 `[ids, cols]`, dequantized per row.
    pub fn rows(&self, ids: &Tensor) -> Result<Tensor> {
        match &self.kernel {
            Kernel::Candle(_, q) => q.embedding(ids),
            Kernel::Dense(t) => t.index_select(ids, 0),
            Kernel::Int8(_) | Kernel::Int4(_) => {
                let ids = ids.flatten_all()?.to_vec1::<u32>()?;
                let rows: Vec<usize> = ids.iter().map(|&i| i as usize).collect();
                let values = self.codes.select_rows(&rows).dequantize();
                Tensor::from_vec(values, (rows.len(), self.codes.cols), &Device::Cpu)
            }
        }
    }

    /// Only the rows at `idx`, same precision and execution, without rounding again.
    pub fn select_rows(&self, idx: &[usize]) -> Result<Self> {
        Self::with_execution(self.codes.select_rows(idx), self.execution)
    }
}

/// `x · Wᵀ (+ bias)` in the kernel `w` was packed for, on the contiguous f32 activations of `x`
/// (`[m, k]`), on the kernels' threads.
fn packed_product(x: &Tensor, bias: Option<&Tensor>, w: &impl PackedWeights) -> Result<Tensor> {
    let (m, _) = x.dims2()?;
    let x = x.contiguous()?;
    let (storage, layout) = x.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        bail!("the quantized kernels run on the CPU");
    };
    let Some((from, to)) = layout.contiguous_offsets() else {
        bail!("the quantized kernels need contiguous activations");
    };
    let bias = bias.map(|b| b.to_vec1::<f32>()).transpose()?;
    let n = w.dims().rows;
    let x = &cpu.as_slice::<f32>()?[from..to];
    let threads = crate::threads::count();
    let out = row_quant::matmul_t_new(x, m, w, bias.as_deref(), threads);
    Tensor::from_vec(out, (m, n), &Device::Cpu)
}

/// The codes as a candle `QTensor` (no rounding: the blocks are the codes).
fn to_qtensor(codes: &Codes) -> Result<QTensor> {
    // The bytes come from a fresh Vec<u8>; the allocator aligns it beyond the 2 bytes the blocks
    // need (candle asserts it).
    let storage = QStorage::from_data(
        Cow::Owned(codes.to_blocks()),
        &Device::Cpu,
        codes.bits.ggml(),
    )?;
    QTensor::new(storage, (codes.rows, codes.cols))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(rows: usize, cols: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..rows * cols)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32 - 0.5) * 0.2
            })
            .collect()
    }

    #[test]
    fn a_tie_of_extremes_maps_the_positive_one_to_the_end_and_quantizing_again_changes_nothing() {
        for bits in [Bits::Int8, Bits::Int4] {
            let mut v = sample(2, 64, 3);
            // Equal and opposite extremes, the negative one first.
            (v[1], v[9]) = (-0.75, 0.75);
            let c = Codes::quantize(&v, 2, 64, bits).unwrap();
            let (low, high) = bits.range();
            assert_eq!(i32::from(c.codes[9]), high, "{bits:?}");
            if bits == Bits::Int8 {
                // (At int4 a clipped scale may put both ends on the end codes.)
                assert_eq!(
                    i32::from(c.codes[1]),
                    -high,
                    "{bits:?}: inside the range, not clamped"
                );
            }
            assert!(c.codes.iter().all(|&q| i32::from(q) >= low));
            let again = Codes::quantize(&c.dequantize(), 2, 64, bits).unwrap();
            assert_eq!(
                again, c,
                "{bits:?}: quantizing dequantized codes is the identity"
            );
        }
    }

    #[test]
    fn codes_stay_in_range_and_the_extreme_is_exact() {
        for bits in [Bits::Int8, Bits::Int4] {
            let mut v = sample(3, 64, 7);
            v[5] = -0.5;
            v[104] = 0.4;
            let c = Codes::quantize(&v, 3, 64, bits).unwrap();
            let (low, high) = bits.range();
            assert!(c
                .codes
                .iter()
                .all(|&q| (low..=high).contains(&i32::from(q))));
            assert_eq!(
                c.codes[5] as i32, low,
                "{bits:?}: negative extreme maps to the low end"
            );
            assert_eq!(
                c.codes[104] as i32, high,
                "{bits:?}: positive extreme maps to the high end"
            );
            let d = c.dequantize();
            for (g, (x, y)) in v.iter().zip(&d).enumerate() {
                let s = c.scales[g / c.group].to_f32();
                let clamped = [low, high].contains(&i32::from(c.codes[g])) && bits == Bits::Int4;
                assert!(
                    (x - y).abs() <= s / 2.0 + 1e-7 || clamped,
                    "{bits:?} entry {g}: {x} vs {y}"
                );
            }
        }
    }

    /// Squared rounding error of every group of `c` against `v`.
    fn group_errors(v: &[f32], c: &Codes) -> Vec<f64> {
        v.iter()
            .zip(c.dequantize())
            .map(|(x, y)| f64::from(x - y).powi(2))
            .collect::<Vec<_>>()
            .chunks(c.group)
            .map(|g| g.iter().sum())
            .collect()
    }

    #[test]
    fn int4_clipping_never_rounds_a_group_worse_than_its_full_range_and_helps_an_outlier() {
        let mut v = sample(8, 64, 11);
        v[3] = 0.9; // one outlier in the first group: the full range rounds the rest coarsely
        let c = Codes::quantize(&v, 8, 64, Bits::Int4).unwrap();
        let full = Codes {
            scales: v
                .chunks(GROUP)
                .map(|g| f16::from_f32(full_range_scale(g, (-8, 7))))
                .collect(),
            ..c.clone()
        };
        let full = Codes {
            codes: v
                .iter()
                .enumerate()
                .map(|(i, &x)| code(x, full.scales[i / GROUP].to_f32(), (-8, 7)))
                .collect(),
            ..full
        };
        let (clipped, plain) = (group_errors(&v, &c), group_errors(&v, &full));
        for (g, (a, b)) in clipped.iter().zip(&plain).enumerate() {
            assert!(a <= b, "group {g}: {a} > {b}");
        }
        assert!(clipped[0] < plain[0], "the outlier's group rounds finer");
        assert!(c.scales[0] < full.scales[0], "by a clipped scale");
    }

    #[test]
    fn blocks_are_candles_layout_and_dequantize_identically() {
        for bits in [Bits::Int8, Bits::Int4] {
            let v = sample(4, 96, 3);
            let c = Codes::quantize(&v, 4, 96, bits).unwrap();
            let blocks = c.to_blocks();
            assert_eq!(
                blocks.len(),
                4 * 96 / GROUP * (2 + GROUP * bits.count() / 8)
            );
            let q = to_qtensor(&c).unwrap();
            assert_eq!(q.data().unwrap().as_ref(), blocks.as_slice(), "{bits:?}");
            let candle: Vec<f32> = q
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(candle, c.dequantize(), "{bits:?}: no rounding again");
        }
    }

    #[test]
    fn selected_rows_keep_their_codes() {
        let c = Codes::quantize(&sample(5, 32, 1), 5, 32, Bits::Int4).unwrap();
        let s = c.select_rows(&[4, 1]);
        assert_eq!(s.codes[..32], c.codes[128..160]);
        assert_eq!(s.scales, vec![c.scales[4], c.scales[1]]);
        assert_eq!(Bits::Int8.stored_bytes(5, 64), 5 * 64 + 5 * 2);
        assert_eq!(Bits::Int4.stored_bytes(5, 64), 5 * 32 + 5 * 2 * 2);
    }

    #[test]
    fn refuses_inner_dimensions_off_the_group_size() {
        assert!(unquantizable(384).is_none());
        let err = Codes::quantize(&[0.0; 40], 2, 20, Bits::Int8).unwrap_err();
        assert!(err.to_string().contains("not a positive multiple"), "{err}");
    }

    #[test]
    fn scales_beyond_fp16_are_refused_not_stored_as_infinity() {
        let mut v = vec![0.01f32; 64];
        v[5] = 1e7;
        let why = scale_out_of_range(&v, 64, Bits::Int8).unwrap();
        assert!(
            why.contains("1e7") && why.contains("overflows fp16"),
            "{why}"
        );
        let err = Codes::quantize(&v, 1, 64, Bits::Int8).unwrap_err();
        assert!(err.to_string().contains("overflows fp16"), "{err}");
        // 65504 · 127 is the largest int8 row that fits; at int4 the limit is 65504 · 7.
        v[5] = 8e6;
        assert!(scale_out_of_range(&v, 64, Bits::Int8).is_none());
        assert!(scale_out_of_range(&v, 64, Bits::Int4).is_some());
        let tiny = vec![1e-12f32; 32];
        assert!(scale_out_of_range(&tiny, 32, Bits::Int8)
            .unwrap()
            .contains("rounds to 0"));
        assert!(scale_out_of_range(&[0.0; 32], 32, Bits::Int8).is_none());
    }
}
