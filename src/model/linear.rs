//! A linear layer `y = x Wᵀ + b`. The weight is a [`Weight`], not a bare tensor, so that a
//! quantized matrix can take the place of a dense one without changing any caller: callers
//! multiply, slice, count and export through its methods.

use std::sync::Mutex;

use candle_core::{bail, DType, Device, Result, Tensor, TensorId, D};

use crate::formats::quant::{Codes, Execution, Precision, QuantMatrix};
use crate::formats::striped::Striped;
use crate::kernels::dense_product;
use crate::kernels::f32_gemm::PackedF32;

/// The weight matrix of a linear layer, `[out, in]` as in PyTorch.
#[derive(Debug, Clone)]
pub enum Weight {
    /// A dense f32 matrix.
    Dense(Tensor),
    /// Integer codes with group scales, run quantized or dequantized (see [`QuantMatrix`]).
    Quantized(QuantMatrix),
    /// Parts stacked along the outputs, e.g. a fused query/key/value projection whose parts
    /// have different precisions.
    Stacked(Stack),
    /// Block-sparse column stripes (block-structured pruning), zeros neither stored nor run.
    Striped(Striped),
}

/// Weights stacked along the outputs. When every part runs the same way — as an f32 matrix, or
/// in the int8 or the int4 kernel — the stack keeps them fused too, so the projection stays one
/// product.
#[derive(Debug, Clone)]
pub struct Stack {
    /// The parts, top to bottom.
    pub parts: Vec<Weight>,
    fused: Option<Fused>,
}

/// The parts of a stack as one matrix.
#[derive(Debug, Clone)]
enum Fused {
    F32(Tensor),
    /// Quantized rows of one precision, run in its kernel: each row keeps its own scales, so
    /// stacking their codes changes no value.
    Kernel(QuantMatrix),
}

impl Stack {
    /// Stacks `parts` (same input dimension).
    pub fn new(parts: Vec<Weight>) -> Result<Self> {
        let dense: Option<Vec<Tensor>> = parts.iter().map(Weight::f32_matrix).collect();
        let fused = match dense {
            Some(d) => Some(Fused::F32(Tensor::cat(&d, 0)?)),
            None => kernel_parts(&parts)
                .map(|codes| QuantMatrix::with_execution(Codes::stack(&codes)?, Execution::Kernel))
                .transpose()?
                .map(Fused::Kernel),
        };
        Ok(Stack { parts, fused })
    }
}

/// The codes of `parts` when every one is a matrix of one precision run in its kernel.
fn kernel_parts(parts: &[Weight]) -> Option<Vec<&Codes>> {
    let bits = match parts.first()? {
        Weight::Quantized(q) => q.bits(),
        _ => return None,
    };
    parts
        .iter()
        .map(|p| match p {
            Weight::Quantized(q) if q.execution == Execution::Kernel && q.bits() == bits => {
                Some(q.codes.as_ref())
            }
            _ => None,
        })
        .collect()
}

impl Weight {
    /// `(out, in)`.
    pub fn dims(&self) -> (usize, usize) {
        match self {
            Weight::Dense(w) => (w.dims()[0], w.dims()[1]),
            Weight::Quantized(q) => q.dims(),
            Weight::Striped(s) => s.dims,
            Weight::Stacked(s) => (
                s.parts.iter().map(|p| p.dims().0).sum(),
                s.parts.first().map_or(0, |p| p.dims().1),
            ),
        }
    }

    /// Number of parameters (the kept ones of a block-sparse matrix).
    pub fn elem_count(&self) -> usize {
        if let Weight::Striped(s) = self {
            return s.kept();
        }
        let (out, inp) = self.dims();
        out * inp
    }

    /// The matrix as a dense f32 tensor `[out, in]` (dequantized when quantized).
    pub fn to_dense(&self) -> Result<Tensor> {
        match self {
            Weight::Dense(w) => Ok(w.clone()),
            Weight::Quantized(q) => q.dequantize(),
            Weight::Striped(s) => s.to_dense(),
            Weight::Stacked(s) => {
                let dense = s
                    .parts
                    .iter()
                    .map(Weight::to_dense)
                    .collect::<Result<Vec<_>>>()?;
                Tensor::cat(&dense, 0)
            }
        }
    }

    /// The matrix's precision.
    pub fn precision(&self) -> Precision {
        match self {
            Weight::Dense(_) | Weight::Striped(_) => Precision::Float,
            Weight::Quantized(q) => q.bits().into(),
            Weight::Stacked(s) => {
                let mut all = s.parts.iter().map(Weight::precision);
                let first = all.next().unwrap_or(Precision::Float);
                match all.all(|p| p == first) {
                    true => first,
                    false => Precision::Mixed,
                }
            }
        }
    }

    /// The f32 matrix this weight is multiplied with, when it runs as one (dense, or quantized
    /// and executed dequantized).
    fn f32_matrix(&self) -> Option<Tensor> {
        match self {
            Weight::Dense(w) => Some(w.clone()),
            Weight::Striped(s) if s.dense_execution() => s.to_dense().ok(),
            Weight::Quantized(q) if q.execution == Execution::Dequantized => q.dequantize().ok(),
            _ => None,
        }
    }

    /// The matrix itself when it runs as one dense f32 tensor at `rows` input rows (stored so,
    /// or a striped matrix that runs dense).
    fn plain_f32(&self, rows: usize) -> Option<&Tensor> {
        match self {
            Weight::Dense(w)
            | Weight::Stacked(Stack {
                fused: Some(Fused::F32(w)),
                ..
            }) => Some(w),
            Weight::Striped(s) => s.dense_for(rows),
            _ => None,
        }
    }

    /// The matrix when it is stored as one dense f32 tensor, whatever the rows.
    fn dense_tensor(&self) -> Option<&Tensor> {
        match self {
            Weight::Dense(w)
            | Weight::Stacked(Stack {
                fused: Some(Fused::F32(w)),
                ..
            }) => Some(w),
            _ => None,
        }
    }

    /// True when no part of the matrix is quantized.
    pub fn is_dense(&self) -> bool {
        match self {
            Weight::Dense(_) | Weight::Striped(_) => true,
            Weight::Quantized(_) => false,
            Weight::Stacked(s) => s.parts.iter().all(Weight::is_dense),
        }
    }

    /// `x Wᵀ` for a 2-D `x` of shape `[rows, in]`.
    fn matmul_t(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Weight::Dense(w) => x.matmul(&w.t()?),
            Weight::Quantized(q) => q.matmul_t(x),
            Weight::Striped(s) => s.matmul_t(x),
            Weight::Stacked(Stack {
                fused: Some(Fused::F32(w)),
                ..
            }) => x.matmul(&w.t()?),
            Weight::Stacked(Stack {
                fused: Some(Fused::Kernel(q)),
                ..
            }) => q.matmul_t(x),
            Weight::Stacked(s) => {
                let outs = s
                    .parts
                    .iter()
                    .map(|p| p.matmul_t(x))
                    .collect::<Result<Vec<_>>>()?;
                Tensor::cat(&outs, D::Minus1)
            }
        }
    }

    /// `x Wᵀ + bias`: the quantized kernels add the bias themselves, other weights add it
    /// afterwards.
    fn matmul_t_bias(&self, x: &Tensor, bias: &Tensor) -> Result<Tensor> {
        match self {
            Weight::Quantized(q)
            | Weight::Stacked(Stack {
                fused: Some(Fused::Kernel(q)),
                ..
            }) => q.matmul_t_bias(x, bias),
            _ => self.matmul_t(x)?.broadcast_add(bias),
        }
    }

    /// The rows at `ids` (an embedding lookup), `[ids, in]`.
    pub fn lookup(&self, ids: &Tensor) -> Result<Tensor> {
        match self {
            Weight::Dense(w) => w.index_select(ids, 0),
            Weight::Quantized(q) => q.rows(ids),
            Weight::Stacked(_) | Weight::Striped(_) => self.to_dense()?.index_select(ids, 0),
        }
    }

    /// The rows (`dim` 0, outputs) or columns (`dim` 1, inputs) at `idx`, in that order. A
    /// quantized matrix keeps its codes when rows are chosen; choosing its columns would cut
    /// through its groups, so it is refused (prune before quantizing).
    pub fn select(&self, dim: usize, idx: &[usize]) -> Result<Weight> {
        match self {
            Weight::Dense(w) => Ok(Weight::Dense(select(w, dim, idx)?)),
            Weight::Quantized(q) if dim == 0 => Ok(Weight::Quantized(q.select_rows(idx)?)),
            _ if self.is_dense() => Ok(Weight::Dense(select(&self.to_dense()?, dim, idx)?)),
            _ => bail!("a quantized matrix cannot be sliced; prune before quantizing"),
        }
    }

    /// Rows `start..start + len` as they are stored: a striped matrix stays striped (and runs as
    /// before) even when it runs dense, where [`Weight::narrow_rows`] takes a dense view. The
    /// exporter writes the fused query/key/value matrix's parts with it, so that their removed
    /// weights stay out of the file.
    pub fn narrow_rows_stored(&self, start: usize, len: usize) -> Result<Weight> {
        match self {
            Weight::Striped(s) => Ok(Weight::Striped(s.narrow_rows(start, len)?)),
            other => other.narrow_rows(start, len),
        }
    }

    /// Output rows `start..start + len`.
    pub fn narrow_rows(&self, start: usize, len: usize) -> Result<Weight> {
        match self {
            Weight::Dense(w) => Ok(Weight::Dense(w.narrow(0, start, len)?)),
            // A matrix that runs dense is narrowed as a view (this runs on every forward pass
            // that computes only some rows), not rebuilt stripe by stripe.
            Weight::Striped(s) if s.dense_execution() => {
                Ok(Weight::Dense(s.to_dense()?.narrow(0, start, len)?))
            }
            Weight::Striped(s) => Ok(Weight::Striped(s.narrow_rows(start, len)?)),
            Weight::Quantized(q) => Ok(Weight::Quantized(
                q.select_rows(&(start..start + len).collect::<Vec<_>>())?,
            )),
            Weight::Stacked(s) => {
                let mut kept = Vec::new();
                let mut first = 0;
                for part in &s.parts {
                    let rows = part.dims().0;
                    let (from, to) = (start.max(first), (start + len).min(first + rows));
                    if from < to {
                        kept.push(if to - from == rows {
                            part.clone()
                        } else {
                            part.narrow_rows(from - first, to - from)?
                        });
                    }
                    first += rows;
                }
                // An f32 fused matrix is narrowed as a view: this runs on every forward pass
                // that computes only some rows (keys and values of the last layer). An int8 one
                // would be packed again each time; its parts run separately instead (each is
                // packed once, shared by its clones).
                let fused = match &s.fused {
                    Some(Fused::F32(f)) => Some(Fused::F32(f.narrow(0, start, len)?)),
                    _ => None,
                };
                Ok(match kept.len() {
                    1 => kept.pop().expect("one part"),
                    _ => Weight::Stacked(Stack { parts: kept, fused }),
                })
            }
        }
    }
}

/// A dense layer `y = x Wᵀ + b`.
#[derive(Debug, Clone)]
pub struct Linear {
    /// Weight, `[out, in]`.
    pub weight: Weight,
    /// Bias, `[out]`.
    pub bias: Tensor,
    /// The f32 weight packed for inference, once.
    packed: PackedView,
}

/// An f32 weight packed for the inference kernel ([`PackedF32`]) on its first product: a runtime
/// view, never stored. It remembers the tensor it was packed from, so a weight that is replaced
/// is packed again; a weight that trains (a variable, or computed from one) is never packed, as
/// its values change in place. A clone starts with the same view (the packed values are shared).
/// A view that is `off` never packs (the layer runs through the general product).
#[derive(Debug, Default)]
struct PackedView {
    slot: Mutex<Option<(TensorId, PackedF32)>>,
    off: bool,
}

impl Clone for PackedView {
    fn clone(&self) -> Self {
        PackedView {
            slot: Mutex::new(self.lock().clone()),
            off: self.off,
        }
    }
}

impl PackedView {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(TensorId, PackedF32)>> {
        // A panic while packing leaves no half-written view: the slot is only ever assigned.
        self.slot
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// `w` packed, from this view when it was packed from `w`; `None` when `w` trains, is not
    /// an f32 CPU matrix or the view is off.
    fn get(&self, w: &Tensor) -> Result<Option<PackedF32>> {
        let plain = w.dtype() == DType::F32 && w.device().is_cpu() && w.rank() == 2;
        if self.off || w.track_op() || !plain {
            return Ok(None);
        }
        if let Some((id, packed)) = &*self.lock() {
            if *id == w.id() {
                return Ok(Some(packed.clone()));
            }
        }
        let (rows, cols) = w.dims2()?;
        let packed = crate::kernels::fastmath::read_f32(&w.contiguous()?, |values| {
            PackedF32::pack(values, rows, cols)
        })?;
        *self.lock() = Some((w.id(), packed.clone()));
        Ok(Some(packed))
    }

    /// A view holding `packed` for `w`.
    fn holding(w: &Tensor, packed: PackedF32) -> Self {
        PackedView {
            slot: Mutex::new(Some((w.id(), packed))),
            off: false,
        }
    }
}

impl Linear {
    /// A layer with a dense weight `[out, in]` and bias `[out]`.
    pub fn dense(weight: Tensor, bias: Tensor) -> Self {
        Linear::new(Weight::Dense(weight), bias)
    }

    /// A layer with `weight` (`[out, in]`) and `bias` (`[out]`).
    pub fn new(weight: Weight, bias: Tensor) -> Self {
        Linear {
            weight,
            bias,
            packed: PackedView::default(),
        }
    }

    /// A layer with no weights on one side (zero heads or zero FFN neurons kept): only its bias
    /// (zeros when `bias` is `None`) contributes.
    pub fn empty(out: usize, inp: usize, bias: Option<Tensor>) -> Result<Self> {
        let dev = &Device::Cpu;
        let bias = match bias {
            Some(b) => b,
            None => Tensor::zeros(out, DType::F32, dev)?,
        };
        Ok(Linear::dense(
            Tensor::zeros((out, inp), DType::F32, dev)?,
            bias,
        ))
    }

    /// Stacks layers along their outputs (fused projections): one dense matrix when every part
    /// is dense, otherwise the parts side by side.
    pub fn concat_rows(parts: &[Linear]) -> Result<Self> {
        let b: Vec<&Tensor> = parts.iter().map(|p| &p.bias).collect();
        let striped: Option<Vec<&Striped>> = parts
            .iter()
            .map(|p| match &p.weight {
                Weight::Striped(s) => Some(s),
                _ => None,
            })
            .collect();
        let weight = if let Some(striped) = striped {
            Weight::Striped(Striped::stack(&striped)?)
        } else if parts.iter().all(|p| p.weight.is_dense()) {
            let w = parts
                .iter()
                .map(|p| p.weight.to_dense())
                .collect::<Result<Vec<_>>>()?;
            Weight::Dense(Tensor::cat(&w, 0)?)
        } else {
            Weight::Stacked(Stack::new(
                parts.iter().map(|p| p.weight.clone()).collect(),
            )?)
        };
        Ok(Linear::new(weight, Tensor::cat(&b, D::Minus1)?))
    }

    /// Applies the layer to `x` of shape `[..., in]` as one 2-D matrix product.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let inner = dims[dims.len() - 1];
        let rows = x.elem_count() / inner.max(1);
        if let Some(w) = self.weight.plain_f32(rows) {
            if !x.track_op() {
                if let Some(packed) = self.packed.get(w)? {
                    return dense_product::packed_linear(x, &packed, &self.bias);
                }
            }
            return dense_product::linear(x, w, &self.bias);
        }
        let out = self
            .weight
            .matmul_t_bias(&x.reshape((rows, inner))?, &self.bias)?;
        let mut out_dims = dims;
        *out_dims.last_mut().expect("non-scalar input") = self.out_features();
        out.reshape(out_dims)
    }

    /// Applies only output rows `start..start + len` of the layer (a slice of a fused projection).
    pub fn forward_rows(&self, x: &Tensor, start: usize, len: usize) -> Result<Tensor> {
        self.narrow_rows(start, len)?.forward(x)
    }

    /// Output rows `start..start + len` as a layer of their own. A packed f32 weight passes on a
    /// view of its panels when the rows begin and end on one, so that a forward pass that computes
    /// only some rows (the last layer's keys and values) packs nothing.
    pub fn narrow_rows(&self, start: usize, len: usize) -> Result<Linear> {
        let weight = self.weight.narrow_rows(start, len)?;
        let packed = match (self.weight.dense_tensor(), weight.dense_tensor()) {
            _ if self.packed.off => self.never_packed().packed,
            (Some(whole), Some(part)) => self
                .packed
                .get(whole)?
                .and_then(|p| p.narrow_rows(start, len))
                .map(|p| PackedView::holding(part, p))
                .unwrap_or_default(),
            _ => PackedView::default(),
        };
        Ok(Linear {
            weight,
            bias: self.bias.narrow(0, start, len)?,
            packed,
        })
    }

    /// Lets go of the packed copy of the weight (freed once no clone holds it; the next
    /// inference product packs it again).
    pub fn drop_packed(&self) {
        *self.packed.lock() = None;
    }

    /// The layer, never packed: its products run through the general matrix product (the same
    /// values within rounding), holding no packed copy.
    pub fn never_packed(&self) -> Linear {
        Linear {
            weight: self.weight.clone(),
            bias: self.bias.clone(),
            packed: PackedView {
                off: true,
                ..PackedView::default()
            },
        }
    }

    /// Output rows `start..start + len` as stored ([`Weight::narrow_rows_stored`]).
    pub fn narrow_rows_stored(&self, start: usize, len: usize) -> Result<Linear> {
        Ok(Linear::new(
            self.weight.narrow_rows_stored(start, len)?,
            self.bias.narrow(0, start, len)?,
        ))
    }

    /// Only the outputs at `rows` (weight rows and bias entries), in that order.
    pub fn select_outputs(&self, rows: &[usize]) -> Result<Linear> {
        Ok(Linear::new(
            self.weight.select(0, rows)?,
            select(&self.bias, 0, rows)?,
        ))
    }

    /// Only the inputs at `cols` (weight columns), in that order; the bias is unchanged.
    pub fn select_inputs(&self, cols: &[usize]) -> Result<Linear> {
        Ok(Linear::new(self.weight.select(1, cols)?, self.bias.clone()))
    }

    /// Number of outputs.
    pub fn out_features(&self) -> usize {
        self.weight.dims().0
    }

    /// Number of parameters (weight and bias).
    pub fn elem_count(&self) -> usize {
        self.weight.elem_count() + self.bias.elem_count()
    }
}

/// Entries of `t` at `idx` along `dim`, contiguous.
fn select(t: &Tensor, dim: usize, idx: &[usize]) -> Result<Tensor> {
    let idx: Vec<u32> = idx.iter().map(|&i| i as u32).collect();
    let n = idx.len();
    t.index_select(&Tensor::from_vec(idx, n, &Device::Cpu)?, dim)?
        .contiguous()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::quant::Bits;

    fn layer() -> Linear {
        let dev = Device::Cpu;
        Linear::dense(
            Tensor::new(&[[1f32, 2.], [3., 4.], [5., 6.]], &dev).unwrap(),
            Tensor::new(&[0.5f32, 0., -1.], &dev).unwrap(),
        )
    }

    #[test]
    fn linear_matches_manual_product() {
        let x = Tensor::new(&[[[1f32, 1.]], [[0., 2.]]], &Device::Cpu).unwrap();
        let y = layer().forward(&x).unwrap();
        assert_eq!(y.dims(), &[2, 1, 3]);
        let v: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(v, vec![3.5, 7., 10., 4.5, 8., 11.]);
    }

    /// `layer`'s output on `x`, flattened.
    fn outputs(layer: &Linear, x: &Tensor) -> Vec<f32> {
        layer
            .forward(x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    #[test]
    fn the_packed_view_follows_a_replaced_or_training_weight() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (5, 32), &dev).unwrap();
        let bias = Tensor::zeros(20, DType::F32, &dev).unwrap();
        let (a, b) = (
            Tensor::randn(0f32, 1.0, (20, 32), &dev).unwrap(),
            Tensor::randn(0f32, 1.0, (20, 32), &dev).unwrap(),
        );
        let mut layer = Linear::dense(a.clone(), bias.clone());
        let first = outputs(&layer, &x);
        assert!(
            layer.packed.lock().is_some(),
            "an inference product packs the weight"
        );
        layer.weight = Weight::Dense(b.clone());
        assert_eq!(
            outputs(&layer, &x),
            outputs(&Linear::dense(b.clone(), bias.clone()), &x)
        );
        assert_ne!(outputs(&layer, &x), first);
        // A variable is updated in place: it must never be multiplied from a stale packing.
        let var = candle_core::Var::from_tensor(&a).unwrap();
        let training = Linear::dense(var.as_tensor().clone(), bias.clone());
        let close = |got: Vec<f32>, want: &[f32]| {
            // The training path sums in the gemm crate's order: the same up to the last bits.
            for (g, w) in got.iter().zip(want) {
                assert!((g - w).abs() < 1e-4, "{g} vs {w}");
            }
        };
        close(outputs(&training, &x), &first);
        var.set(&b).unwrap();
        close(
            outputs(&training, &x),
            &outputs(&Linear::dense(b, bias), &x),
        );
        assert!(
            training.packed.lock().is_none(),
            "a variable is never packed"
        );
    }

    #[test]
    fn a_layer_lets_go_of_its_packed_weight_and_a_never_packed_copy_packs_nothing() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (5, 32), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (24, 32), &dev).unwrap();
        let layer = Linear::dense(w, Tensor::zeros(24, DType::F32, &dev).unwrap());
        let packed = outputs(&layer, &x);
        let plain = layer.never_packed();
        assert!(plain.packed.lock().is_none(), "the copy shares no packing");
        let unpacked = outputs(&plain, &x);
        for (a, b) in unpacked.iter().zip(&packed) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
        assert!(plain.packed.lock().is_none(), "a product packs nothing");
        assert!(
            plain.narrow_rows(8, 8).unwrap().packed.off,
            "nor do its row views"
        );
        layer.drop_packed();
        assert!(layer.packed.lock().is_none());
        assert_eq!(outputs(&layer, &x), packed, "the next product packs again");
        assert!(layer.packed.lock().is_some());
    }

    #[test]
    fn a_row_view_of_a_packed_layer_multiplies_like_its_rows() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (3, 24), &dev).unwrap();
        let layer = Linear::dense(
            Tensor::randn(0f32, 1.0, (48, 24), &dev).unwrap(),
            Tensor::randn(0f32, 1.0, 48, &dev).unwrap(),
        );
        for (start, len) in [(16, 32), (16, 16), (8, 16)] {
            let rows = layer.narrow_rows(start, len).unwrap();
            let shared = rows.packed.lock().is_some();
            assert_eq!(
                shared,
                start % 16 == 0,
                "rows {start}..+{len}: a view only on panels"
            );
            let alone = Linear::dense(
                layer
                    .weight
                    .to_dense()
                    .unwrap()
                    .narrow(0, start, len)
                    .unwrap()
                    .contiguous()
                    .unwrap(),
                layer.bias.narrow(0, start, len).unwrap(),
            );
            assert_eq!(
                outputs(&rows, &x),
                outputs(&alone, &x),
                "rows {start}..+{len}"
            );
        }
    }

    #[test]
    fn selecting_outputs_and_inputs_keeps_the_chosen_entries() {
        let l = layer().select_outputs(&[2, 0]).unwrap();
        assert_eq!(l.weight.dims(), (2, 2));
        let w: Vec<Vec<f32>> = l.weight.to_dense().unwrap().to_vec2().unwrap();
        assert_eq!(w, vec![vec![5., 6.], vec![1., 2.]]);
        assert_eq!(l.bias.to_vec1::<f32>().unwrap(), vec![-1., 0.5]);
        let l = layer().select_inputs(&[1]).unwrap();
        assert_eq!(l.weight.dims(), (3, 1));
        assert_eq!(l.elem_count(), 6);
    }

    /// How far the kernel's product `x · wᵀ` may be from the float one when only `x` is rounded:
    /// each row of `x` is coded in 128 steps over `[min(0, min x), max(0, max x)]`, so each of its
    /// entries is off by at most half a step, and an output by half a step times the row of `w`'s
    /// absolute sum (plus float slack).
    fn activation_rounding_bounds(x: &Tensor, w: &Tensor) -> Vec<f32> {
        let (x, w) = (x.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
        let mut bounds = Vec::new();
        for row in &x {
            let hi = row.iter().fold(0f32, |m, &v| m.max(v));
            let lo = row.iter().fold(0f32, |m, &v| m.min(v));
            let half_step = (hi - lo) / 127.0 / 2.0;
            for w_row in &w {
                let reach: f32 = w_row.iter().map(|v| v.abs()).sum();
                bounds.push(half_step * reach * 1.001 + 1e-4);
            }
        }
        bounds
    }

    #[test]
    fn a_stack_of_float_run_parts_multiplies_as_one_matrix() {
        use crate::formats::quant::Codes;
        let dev = Device::Cpu;
        let dense = Tensor::randn(0f32, 1.0, (4, 32), &dev).unwrap();
        let codes = Codes::from_tensor(&dense, Bits::Int8).unwrap();
        let part = |e| Weight::Quantized(QuantMatrix::with_execution(codes.clone(), e).unwrap());
        let x = Tensor::randn(0f32, 1.0, (3, 32), &dev).unwrap();
        for (execution, fused) in [(Execution::Dequantized, true), (Execution::Kernel, false)] {
            let stack = Stack::new(vec![Weight::Dense(dense.clone()), part(execution)]).unwrap();
            assert_eq!(stack.fused.is_some(), fused, "{execution:?}");
            let w = Weight::Stacked(stack);
            assert_eq!(w.dims(), (8, 32));
            assert_eq!(w.precision(), Precision::Mixed);
            let got: Vec<f32> = w
                .matmul_t(&x)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let want = x.matmul(&w.to_dense().unwrap().t().unwrap()).unwrap();
            let want: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
            let bounds = match fused {
                true => vec![1e-5; want.len()],
                false => activation_rounding_bounds(&x, &w.to_dense().unwrap()),
            };
            for ((a, b), bound) in got.iter().zip(&want).zip(&bounds) {
                assert!((a - b).abs() <= *bound, "{execution:?}: {a} vs {b}");
            }
            assert!(matches!(w.narrow_rows(4, 4).unwrap(), Weight::Quantized(_)));
            let across = w.narrow_rows(2, 4).unwrap();
            let Weight::Stacked(inner) = &across else {
                panic!("rows 2..6 span both parts");
            };
            assert_eq!(
                inner.fused.is_some(),
                fused,
                "{execution:?}: the view stays fused"
            );
            let want = w.to_dense().unwrap().narrow(0, 2, 4).unwrap();
            assert_eq!(
                across.to_dense().unwrap().to_vec2::<f32>().unwrap(),
                want.to_vec2::<f32>().unwrap()
            );
        }
    }

    #[test]
    fn a_stack_of_int8_kernel_parts_fuses_without_changing_a_value() {
        stack_of_kernel_parts_fuses_without_changing_a_value(Bits::Int8);
    }

    #[test]
    fn a_stack_of_int4_kernel_parts_fuses_without_changing_a_value() {
        stack_of_kernel_parts_fuses_without_changing_a_value(Bits::Int4);
    }

    fn stack_of_kernel_parts_fuses_without_changing_a_value(bits: Bits) {
        use crate::formats::quant::Codes;
        let dev = Device::Cpu;
        let part = |rows: usize| {
            let dense = Tensor::randn(0f32, 1.0, (rows, 64), &dev).unwrap();
            let codes = Codes::from_tensor(&dense, bits).unwrap();
            Weight::Quantized(QuantMatrix::with_execution(codes, Execution::Kernel).unwrap())
        };
        let parts = vec![part(8), part(24), part(16)];
        let x = Tensor::randn(0f32, 1.0, (5, 64), &dev).unwrap();
        let separate: Vec<Tensor> = parts.iter().map(|p| p.matmul_t(&x).unwrap()).collect();
        let want: Vec<Vec<f32>> = Tensor::cat(&separate, 1).unwrap().to_vec2().unwrap();
        let stack = Stack::new(parts).unwrap();
        assert!(matches!(stack.fused, Some(Fused::Kernel(_))), "{bits:?}");
        let w = Weight::Stacked(stack);
        assert_eq!(w.matmul_t(&x).unwrap().to_vec2::<f32>().unwrap(), want);
        let Weight::Stacked(narrowed) = w.narrow_rows(8, 40).unwrap() else {
            panic!("rows 8..48 are two parts");
        };
        assert!(
            narrowed.fused.is_none(),
            "narrowed quantized parts run separately"
        );
    }
}
