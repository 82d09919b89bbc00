//! A reference interpreter for the operators the exporter writes, on candle tensors: it runs an
//! exported file (decoded from its bytes, so the file itself is what is checked) and checks its
//! structure on the way — every value defined once and before use, every operator known, the
//! declared output shape met. Integers are held as i64, and integer products are computed in f64
//! (exact), so quantized graphs run with ONNX's own semantics (e.g. `DynamicQuantizeLinear`'s
//! per-tensor rounding), not axcompress's kernels.

use std::collections::HashMap;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use prost::Message;

use super::proto::tensor_proto::DataType;
use super::proto::tensor_shape_proto::dimension;
use super::proto::{type_proto, AttributeProto, ModelProto, NodeProto, TensorProto};

/// Decodes an `.onnx` file's bytes (the protobuf schema checks the wire format).
pub fn decode(bytes: &[u8]) -> Result<ModelProto> {
    ModelProto::decode(bytes).context("not an ONNX model (the protobuf does not decode)")
}

/// Runs `model` on `feeds` (graph input name → tensor: i64 ids and mask) and returns its
/// outputs by name, after checking each against its declared element type and fixed dimensions.
pub fn run(model: &ModelProto, feeds: &[(&str, Tensor)]) -> Result<HashMap<String, Tensor>> {
    let graph = model.graph.as_ref().context("the model has no graph")?;
    let mut values: HashMap<String, Tensor> = HashMap::new();
    let define = |values: &mut HashMap<String, Tensor>, name: &str, t: Tensor| -> Result<()> {
        ensure!(
            values.insert(name.to_string(), t).is_none(),
            "value {name} is defined twice"
        );
        Ok(())
    };
    for init in &graph.initializer {
        define(&mut values, init.name(), tensor_of(init)?)?;
    }
    for input in &graph.input {
        let (_, t) = feeds
            .iter()
            .find(|(n, _)| *n == input.name())
            .with_context(|| format!("no feed for graph input {}", input.name()))?;
        define(&mut values, input.name(), t.clone())?;
    }
    for node in &graph.node {
        let inputs = node
            .input
            .iter()
            .map(|name| {
                values.get(name).cloned().with_context(|| {
                    format!("{} reads {name} before anything defines it", node.op_type())
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let outputs = apply(node, &inputs).with_context(|| format!("{} node", node.op_type()))?;
        ensure!(
            outputs.len() == node.output.len(),
            "{} gives {} outputs, the node names {}",
            node.op_type(),
            outputs.len(),
            node.output.len()
        );
        for (name, t) in node.output.iter().zip(outputs) {
            define(&mut values, name, t)?;
        }
    }
    let mut out = HashMap::new();
    for o in &graph.output {
        let t = values
            .remove(o.name())
            .with_context(|| format!("output {} is never computed", o.name()))?;
        check_declared(o, &t)?;
        out.insert(o.name().to_string(), t);
    }
    Ok(out)
}

/// Checks a computed output against its declared element type and fixed dimensions.
fn check_declared(info: &super::proto::ValueInfoProto, t: &Tensor) -> Result<()> {
    let Some(type_proto::Value::TensorType(tt)) =
        info.r#type.as_ref().and_then(|t| t.value.as_ref())
    else {
        bail!("output {} declares no tensor type", info.name());
    };
    ensure!(
        tt.elem_type() == DataType::Float as i32 && t.dtype() == DType::F32,
        "output {} is not the float tensor it declares",
        info.name()
    );
    let dims = &tt.shape.as_ref().context("output without a shape")?.dim;
    ensure!(
        dims.len() == t.rank(),
        "output {} has rank {}, declared {}",
        info.name(),
        t.rank(),
        dims.len()
    );
    for (i, d) in dims.iter().enumerate() {
        if let Some(dimension::Value::DimValue(n)) = d.value {
            ensure!(
                t.dims()[i] as i64 == n,
                "output {} has {} entries on axis {i}, declared {n}",
                info.name(),
                t.dims()[i]
            );
        }
    }
    Ok(())
}

/// An initializer as a tensor: floats as f32, integers as i64.
fn tensor_of(init: &TensorProto) -> Result<Tensor> {
    let dims: Vec<usize> = init.dims.iter().map(|&d| d as usize).collect();
    let raw = init
        .raw_data
        .as_deref()
        .context("initializer without raw_data")?;
    let count: usize = dims.iter().product();
    let dev = &Device::Cpu;
    let ints = |v: Vec<i64>| Tensor::from_vec(v, dims.as_slice(), dev);
    let t = match DataType::try_from(init.data_type()).ok() {
        Some(DataType::Float) => Tensor::from_vec(
            raw.chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
                .collect::<Vec<_>>(),
            dims.as_slice(),
            dev,
        )?,
        // Held as f32: every f16 is an f32, and the graph casts it to f32 anyway.
        Some(DataType::Float16) => Tensor::from_vec(
            raw.chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect::<Vec<_>>(),
            dims.as_slice(),
            dev,
        )?,
        Some(DataType::Int64) => ints(
            raw.chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
                .collect(),
        )?,
        Some(DataType::Int8) => ints(raw.iter().map(|&b| i64::from(b as i8)).collect())?,
        Some(DataType::Uint8) => ints(raw.iter().map(|&b| i64::from(b)).collect())?,
        Some(DataType::Int4) => ints(
            (0..count)
                .map(|i| {
                    let nibble = (raw[i / 2] >> (4 * (i % 2))) & 0x0f;
                    i64::from(((nibble << 4) as i8) >> 4)
                })
                .collect(),
        )?,
        other => bail!("initializer {} has unsupported type {other:?}", init.name()),
    };
    ensure!(
        t.elem_count() == count,
        "initializer {} has the wrong size",
        init.name()
    );
    Ok(t)
}

fn attr<'a>(node: &'a NodeProto, name: &str) -> Option<&'a AttributeProto> {
    node.attribute.iter().find(|a| a.name() == name)
}

fn attr_int(node: &NodeProto, name: &str, default: i64) -> i64 {
    attr(node, name).map_or(default, |a| a.i())
}

/// `axis` (possibly negative) of a rank-`rank` tensor.
fn axis(value: i64, rank: usize) -> usize {
    if value < 0 {
        (rank as i64 + value) as usize
    } else {
        value as usize
    }
}

fn i64s(t: &Tensor) -> Result<Vec<i64>> {
    Ok(t.flatten_all()?.to_vec1::<i64>()?)
}

/// Same dtype for a binary op: ints stay i64 when both are; otherwise both f32.
fn binary(
    a: &Tensor,
    b: &Tensor,
    f: fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>,
) -> Result<Tensor> {
    let (a, b) = if a.dtype() == b.dtype() {
        (a.clone(), b.clone())
    } else {
        (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?)
    };
    Ok(f(&a, &b)?)
}

/// One node's outputs from its inputs.
fn apply(node: &NodeProto, x: &[Tensor]) -> Result<Vec<Tensor>> {
    let one = |t: Tensor| Ok(vec![t]);
    match node.op_type() {
        "Split" => split(node, x),
        "DynamicQuantizeLinear" => dynamic_quantize(&x[0]),
        "Identity" => one(x[0].clone()),
        "Cast" => one(cast(node, &x[0])?),
        "Add" => one(binary(&x[0], &x[1], Tensor::broadcast_add)?),
        "Sub" => one(binary(&x[0], &x[1], Tensor::broadcast_sub)?),
        "Mul" => one(binary(&x[0], &x[1], Tensor::broadcast_mul)?),
        "Div" => one(binary(&x[0], &x[1], Tensor::broadcast_div)?),
        "Pow" => one(x[0].powf(x[1].to_dtype(DType::F64)?.to_scalar::<f64>()?)?),
        "Erf" => one(x[0].erf()?),
        "Floor" => one(x[0].floor()?),
        "Tanh" => one(x[0].tanh()?),
        "Relu" => one(x[0].relu()?),
        "Softmax" => one(softmax(node, &x[0])?),
        "LayerNormalization" => one(layer_norm(node, x)?),
        "MatMul" => one(matmul(&x[0], &x[1])?),
        "MatMulInteger" => one(matmul_integer(x)?),
        "DequantizeLinear" => one(dequantize(node, &x[0], &x[1])?),
        "Unsqueeze" => one(unsqueeze(&x[0], &x[1])?),
        "Shape" => one(shape(node, &x[0])?),
        "Gather" => one(gather(node, &x[0], &x[1])?),
        "Slice" => one(slice(x)?),
        "CumSum" => one(cumsum(&x[0], &x[1])?),
        "Reshape" => one(reshape(&x[0], &x[1])?),
        "Transpose" => one(transpose(node, &x[0])?),
        "Concat" => one(Tensor::cat(
            x,
            axis(attr_int(node, "axis", 0), x[0].rank()),
        )?),
        other => bail!("operator {other} is not one the exporter writes"),
    }
}

fn cast(node: &NodeProto, x: &Tensor) -> Result<Tensor> {
    ensure!(
        attr_int(node, "to", 0) == DataType::Float as i64,
        "only casts to float are written"
    );
    Ok(x.to_dtype(DType::F32)?)
}

/// Requires `node`'s `axis` attribute to be the last axis of `x` (all the exporter writes).
fn last_axis_only(node: &NodeProto, x: &Tensor) -> Result<()> {
    ensure!(
        axis(attr_int(node, "axis", -1), x.rank()) == x.rank() - 1,
        "{} on the last axis only",
        node.op_type()
    );
    Ok(())
}

fn softmax(node: &NodeProto, x: &Tensor) -> Result<Tensor> {
    last_axis_only(node, x)?;
    Ok(candle_nn::ops::softmax_last_dim(x)?)
}

fn layer_norm(node: &NodeProto, x: &[Tensor]) -> Result<Tensor> {
    last_axis_only(node, &x[0])?;
    let eps = attr(node, "epsilon").map_or(1e-5, |a| a.f());
    Ok(candle_nn::ops::layer_norm(
        &x[0].contiguous()?,
        &x[1],
        &x[2],
        eps,
    )?)
}

/// `MatMulInteger` with optional zero points, exact (f64 sums of integers).
fn matmul_integer(x: &[Tensor]) -> Result<Tensor> {
    let centred = |t: &Tensor, zp: Option<&Tensor>| -> Result<Tensor> {
        let t = match zp {
            Some(zp) => t.broadcast_sub(zp)?,
            None => t.clone(),
        };
        Ok(t.to_dtype(DType::F64)?)
    };
    let product = matmul(&centred(&x[0], x.get(2))?, &centred(&x[1], x.get(3))?)?;
    Ok(product.to_dtype(DType::I64)?)
}

fn unsqueeze(x: &Tensor, axes: &Tensor) -> Result<Tensor> {
    let rank = x.rank() + axes.elem_count();
    let mut axes: Vec<usize> = i64s(axes)?.into_iter().map(|a| axis(a, rank)).collect();
    axes.sort_unstable();
    let mut t = x.clone();
    for a in axes {
        t = t.unsqueeze(a)?;
    }
    Ok(t)
}

/// `Shape` with its `start` and `end` attributes (negative ones count from the end).
fn shape(node: &NodeProto, x: &Tensor) -> Result<Tensor> {
    let dims: Vec<i64> = x.dims().iter().map(|&d| d as i64).collect();
    let rank = dims.len() as i64;
    let clamp = |v: i64| (if v < 0 { v + rank } else { v }).clamp(0, rank) as usize;
    let start = clamp(attr_int(node, "start", 0));
    let end = clamp(attr_int(node, "end", rank));
    let part = dims[start..end.max(start)].to_vec();
    let n = part.len();
    Ok(Tensor::from_vec(part, n, &Device::Cpu)?)
}

/// `Gather`: the output has the indices' shape in place of the gathered axis.
fn gather(node: &NodeProto, x: &Tensor, indices: &Tensor) -> Result<Tensor> {
    let a = axis(attr_int(node, "axis", 0), x.rank());
    let flat = indices.flatten_all()?.to_dtype(DType::U32)?;
    let mut dims = x.dims()[..a].to_vec();
    dims.extend_from_slice(indices.dims());
    dims.extend_from_slice(&x.dims()[a + 1..]);
    Ok(x.contiguous()?.index_select(&flat, a)?.reshape(dims)?)
}

/// `Slice` with starts, ends and axes (steps of 1), clamped to each axis.
fn slice(x: &[Tensor]) -> Result<Tensor> {
    let (starts, ends, axes) = (i64s(&x[1])?, i64s(&x[2])?, i64s(&x[3])?);
    let mut t = x[0].clone();
    for ((s, e), a) in starts.iter().zip(&ends).zip(&axes) {
        let a = axis(*a, t.rank());
        let n = t.dims()[a] as i64;
        let (s, e) = ((*s).clamp(0, n), (*e).clamp(0, n));
        t = t.narrow(a, s as usize, (e - s).max(0) as usize)?;
    }
    Ok(t)
}

fn cumsum(x: &Tensor, along: &Tensor) -> Result<Tensor> {
    let a = axis(along.to_scalar::<i64>()?, x.rank());
    Ok(x.to_dtype(DType::F64)?.cumsum(a)?.to_dtype(x.dtype())?)
}

/// `Reshape`: 0 copies the input's dimension, -1 takes what is left.
fn reshape(x: &Tensor, shape: &Tensor) -> Result<Tensor> {
    let shape = i64s(shape)?;
    let mut dims: Vec<usize> = shape
        .iter()
        .enumerate()
        .map(|(i, &d)| {
            if d == 0 {
                x.dims()[i]
            } else {
                d.max(1) as usize
            }
        })
        .collect();
    if let Some(free) = shape.iter().position(|&d| d == -1) {
        let known: usize = dims
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != free)
            .map(|(_, d)| d)
            .product();
        dims[free] = x.elem_count() / known.max(1);
    }
    Ok(x.reshape(dims)?)
}

fn transpose(node: &NodeProto, x: &Tensor) -> Result<Tensor> {
    let perm: Vec<usize> = attr(node, "perm")
        .context("Transpose without perm")?
        .ints
        .iter()
        .map(|&p| p as usize)
        .collect();
    Ok(x.permute(perm)?.contiguous()?)
}

/// `Split` by the sizes of its second input.
fn split(node: &NodeProto, x: &[Tensor]) -> Result<Vec<Tensor>> {
    let a = axis(attr_int(node, "axis", 0), x[0].rank());
    let mut start = 0;
    let mut out = Vec::new();
    for len in i64s(&x[1])? {
        out.push(x[0].narrow(a, start, len as usize)?.contiguous()?);
        start += len as usize;
    }
    ensure!(
        start == x[0].dims()[a],
        "split sizes do not add up to the axis"
    );
    Ok(out)
}

/// `a · b` with `b` broadcast over `a`'s leading dimensions when `b` is a matrix.
fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if b.rank() == 2 && a.rank() > 2 {
        let dims = a.dims();
        let k = dims[dims.len() - 1];
        let rows = a.elem_count() / k.max(1);
        let mut out = dims[..dims.len() - 1].to_vec();
        out.push(b.dims()[1]);
        return Ok(a.reshape((rows, k))?.matmul(b)?.reshape(out)?);
    }
    Ok(a.contiguous()?.matmul(&b.contiguous()?)?)
}

/// ONNX `DynamicQuantizeLinear`: one scale and zero point for the whole tensor, codes `0..=255`.
fn dynamic_quantize(x: &Tensor) -> Result<Vec<Tensor>> {
    let v = x.flatten_all()?.to_vec1::<f32>()?;
    let lo = v.iter().copied().fold(0f32, f32::min);
    let hi = v.iter().copied().fold(0f32, f32::max);
    let scale = (hi - lo) / 255.0;
    let zp = if scale == 0.0 {
        0.0
    } else {
        (-lo / scale).round_ties_even().clamp(0.0, 255.0)
    };
    let codes: Vec<i64> = v
        .iter()
        .map(|&f| {
            let q = if scale == 0.0 {
                0.0
            } else {
                (f / scale).round_ties_even()
            };
            (q + zp).clamp(0.0, 255.0) as i64
        })
        .collect();
    let dev = &Device::Cpu;
    Ok(vec![
        Tensor::from_vec(codes, x.dims(), dev)?,
        Tensor::new(scale, dev)?,
        Tensor::new(zp as i64, dev)?,
    ])
}

/// `DequantizeLinear` per axis, or in blocks along `axis` (`block_size`), zero point 0.
fn dequantize(node: &NodeProto, codes: &Tensor, scale: &Tensor) -> Result<Tensor> {
    let a = axis(attr_int(node, "axis", 1), codes.rank());
    let block = attr_int(node, "block_size", 0) as usize;
    let codes = codes.to_dtype(DType::F32)?;
    let scale = if block > 0 {
        scale.repeat_interleave(block, a)?
    } else {
        let mut dims = vec![1; codes.rank()];
        dims[a] = scale.elem_count();
        scale.reshape(dims)?
    };
    Ok(codes.broadcast_mul(&scale)?)
}

/// Feeds for rows of ids, padded with `pad` to the longest, in the graph's input names; with
/// `with_types` also `token_type_ids` (the second half of each row segment 1 when
/// `two_segments`, else all 0).
pub fn feeds(
    ids: &[Vec<u32>],
    pad: u32,
    with_types: bool,
    two_segments: bool,
) -> Result<Vec<(&'static str, Tensor)>> {
    let len = ids.iter().map(Vec::len).max().unwrap_or(0);
    let (mut flat, mut mask, mut types) = (Vec::new(), Vec::new(), Vec::new());
    for row in ids {
        for i in 0..len {
            flat.push(i64::from(row.get(i).copied().unwrap_or(pad)));
            mask.push(i64::from(i < row.len()));
            types.push(i64::from(
                two_segments && i >= row.len() / 2 && i < row.len(),
            ));
        }
    }
    let dev = &Device::Cpu;
    let shape = (ids.len(), len);
    let mut out = vec![
        ("input_ids", Tensor::from_vec(flat, shape, dev)?),
        ("attention_mask", Tensor::from_vec(mask, shape, dev)?),
    ];
    if with_types {
        out.push(("token_type_ids", Tensor::from_vec(types, shape, dev)?));
    }
    Ok(out)
}

/// Reference the interpreter's `repeat_interleave` needs (candle has none): `t` with every
/// entry along `axis` repeated `times` times.
trait RepeatInterleave {
    fn repeat_interleave(&self, times: usize, axis: usize) -> candle_core::Result<Tensor>;
}

impl RepeatInterleave for Tensor {
    fn repeat_interleave(&self, times: usize, axis: usize) -> candle_core::Result<Tensor> {
        let mut dims = self.dims().to_vec();
        let t = self.unsqueeze(axis + 1)?;
        let mut expanded = t.dims().to_vec();
        expanded[axis + 1] = times;
        dims[axis] *= times;
        t.broadcast_as(expanded)?.contiguous()?.reshape(dims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dynamic_quantize_follows_the_onnx_reference() {
        // The ONNX reference: scale = (max(0, 2) − min(0, −1)) / 255, zp = round(1 / scale) = 85.
        let x = Tensor::new(&[-1f32, 0.0, 2.0], &Device::Cpu).unwrap();
        let out = dynamic_quantize(&x).unwrap();
        assert_eq!(out[0].to_vec1::<i64>().unwrap(), vec![0, 85, 255]);
        assert_eq!(out[2].to_scalar::<i64>().unwrap(), 85);
    }

    #[test]
    fn blocked_dequantize_repeats_each_scale_over_its_block() {
        let codes = Tensor::new(&[[1i64, 1], [1, 1], [1, 1], [1, 1]], &Device::Cpu).unwrap();
        let scale = Tensor::new(&[[2f32, 3.0], [5.0, 7.0]], &Device::Cpu).unwrap();
        let node = NodeProto {
            attribute: vec![
                super::super::graph::int("axis", 0),
                super::super::graph::int("block_size", 2),
            ],
            ..Default::default()
        };
        let w = dequantize(&node, &codes, &scale).unwrap();
        assert_eq!(
            w.to_vec2::<f32>().unwrap(),
            vec![vec![2., 3.], vec![2., 3.], vec![5., 7.], vec![5., 7.]]
        );
    }

    #[test]
    fn undefined_inputs_are_refused() {
        let model = ModelProto {
            graph: Some(super::super::proto::GraphProto {
                node: vec![NodeProto {
                    op_type: Some("Relu".into()),
                    input: vec!["nowhere".into()],
                    output: vec!["y".into()],
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        let err = run(&model, &[]).unwrap_err();
        assert!(
            format!("{err:#}").contains("before anything defines it"),
            "{err:#}"
        );
    }
}
