//! Building an ONNX graph: nodes with fresh value names, initializers, attributes, and the model
//! around them. Only the standard (`ai.onnx`) domain is used.

use half::f16;
use prost::Message;

use super::proto::attribute_proto::AttributeType;
use super::proto::tensor_proto::DataType;
use super::proto::tensor_shape_proto::{dimension, Dimension};
use super::proto::type_proto;
use super::proto::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto,
    TensorShapeProto, TypeProto, ValueInfoProto,
};

/// Fewest values stored as f16 (smaller tensors stay f32: a cast would cost more than it saves).
const MIN_HALF_STORED: usize = 64;

/// The IR version written: ONNX 1.16's, which ONNX Runtime 1.18 and later read.
const IR_VERSION: i64 = 10;

/// A graph under construction. Values are named by what made them plus a counter, so names are
/// unique and the same model always gives the same names.
#[derive(Debug, Default)]
pub struct Graph {
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    inputs: Vec<ValueInfoProto>,
    outputs: Vec<ValueInfoProto>,
    counter: usize,
}

/// One dimension of a graph input or output: fixed, or named and dynamic.
#[derive(Debug, Clone, Copy)]
pub enum Dim {
    /// A fixed size.
    Fixed(i64),
    /// A dynamic axis with this name (`batch`, `sequence`).
    Named(&'static str),
}

impl Graph {
    /// A fresh value name starting with `hint`.
    fn fresh(&mut self, hint: &str) -> String {
        self.counter += 1;
        format!("{hint}_{}", self.counter)
    }

    /// Adds a graph input.
    pub fn input(&mut self, name: &str, elem: DataType, dims: &[Dim]) -> String {
        self.inputs.push(value_info(name, elem, dims));
        name.to_string()
    }

    /// Declares `value` a graph output named `name` (an Identity node renames it).
    pub fn output(&mut self, value: &str, name: &str, elem: DataType, dims: &[Dim]) {
        self.nodes
            .push(node("Identity", &[value], &[name], Vec::new()));
        self.outputs.push(value_info(name, elem, dims));
    }

    /// Adds a node with one output and returns the output's name.
    pub fn op(&mut self, op: &str, inputs: &[&str], attrs: Vec<AttributeProto>) -> String {
        let out = self.fresh(&op.to_lowercase());
        self.nodes.push(node(op, inputs, &[&out], attrs));
        out
    }

    /// Adds a node with `count` outputs and returns their names.
    pub fn op_n(
        &mut self,
        op: &str,
        inputs: &[&str],
        count: usize,
        attrs: Vec<AttributeProto>,
    ) -> Vec<String> {
        let outs: Vec<String> = (0..count).map(|_| self.fresh(&op.to_lowercase())).collect();
        let refs: Vec<&str> = outs.iter().map(String::as_str).collect();
        self.nodes.push(node(op, inputs, &refs, attrs));
        outs
    }

    /// Adds an initializer and returns its name.
    pub fn initializer(&mut self, hint: &str, tensor: TensorData, dims: &[usize]) -> String {
        let name = self.fresh(hint);
        self.initializers.push(tensor.into_proto(&name, dims));
        name
    }

    /// An f32 value from an initializer: stored as f16 and cast to f32 when every value is an
    /// f16 number (an fp16 checkpoint's weights, quantization scales), so files keep the
    /// checkpoint's size; ONNX runtimes fold the cast when they load the file.
    pub fn f32s(&mut self, hint: &str, values: Vec<f32>, dims: &[usize]) -> String {
        let halves: Option<Vec<f16>> = (values.len() >= MIN_HALF_STORED)
            .then(|| {
                values
                    .iter()
                    .map(|&v| {
                        Some(f16::from_f32(v)).filter(|h| h.to_f32().to_bits() == v.to_bits())
                    })
                    .collect()
            })
            .flatten();
        match halves {
            Some(h) => {
                let stored = self.initializer(hint, TensorData::F16(h), dims);
                self.op("Cast", &[&stored], vec![int("to", DataType::Float as i64)])
            }
            None => self.initializer(hint, TensorData::F32(values), dims),
        }
    }

    /// An f32 scalar initializer.
    pub fn scalar(&mut self, hint: &str, value: f32) -> String {
        self.f32s(hint, vec![value], &[])
    }

    /// An i64 initializer (shapes, axes, indices).
    pub fn i64s(&mut self, hint: &str, values: &[i64]) -> String {
        let dims = [values.len()];
        self.initializer(hint, TensorData::I64(values.to_vec()), &dims)
    }

    /// An i64 scalar initializer.
    pub fn i64_scalar(&mut self, hint: &str, value: i64) -> String {
        self.initializer(hint, TensorData::I64(vec![value]), &[])
    }

    /// The finished model: this graph, the opset, and `metadata` as key/value properties.
    pub fn into_model(self, opset: i64, name: &str, metadata: &[(String, String)]) -> ModelProto {
        ModelProto {
            ir_version: Some(IR_VERSION),
            opset_import: vec![OperatorSetIdProto {
                domain: Some(String::new()),
                version: Some(opset),
            }],
            producer_name: Some("axcompress".into()),
            producer_version: Some(env!("CARGO_PKG_VERSION").into()),
            graph: Some(GraphProto {
                node: self.nodes,
                name: Some(name.to_string()),
                initializer: self.initializers,
                input: self.inputs,
                output: self.outputs,
                ..Default::default()
            }),
            metadata_props: metadata
                .iter()
                .map(|(k, v)| super::proto::StringStringEntryProto {
                    key: Some(k.clone()),
                    value: Some(v.clone()),
                })
                .collect(),
            ..Default::default()
        }
    }
}

/// The serialized bytes of a model.
pub fn encode(model: &ModelProto) -> Vec<u8> {
    model.encode_to_vec()
}

/// Initializer contents.
#[derive(Debug, Clone)]
pub enum TensorData {
    /// 32-bit floats.
    F32(Vec<f32>),
    /// 16-bit floats.
    F16(Vec<f16>),
    /// 64-bit integers.
    I64(Vec<i64>),
    /// 8-bit signed integers.
    I8(Vec<i8>),
    /// 8-bit unsigned integers.
    U8(Vec<u8>),
    /// 4-bit signed integers (each in `-8..=7`), packed two per byte, low nibble first.
    I4(Vec<i8>),
}

impl TensorData {
    /// The tensor proto named `name` with shape `dims`; values go in `raw_data` (little-endian).
    fn into_proto(self, name: &str, dims: &[usize]) -> TensorProto {
        let (elem, raw): (DataType, Vec<u8>) = match self {
            TensorData::F32(v) => (
                DataType::Float,
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ),
            TensorData::F16(v) => (
                DataType::Float16,
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ),
            TensorData::I64(v) => (
                DataType::Int64,
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ),
            TensorData::I8(v) => (DataType::Int8, v.iter().map(|&x| x as u8).collect()),
            TensorData::U8(v) => (DataType::Uint8, v),
            TensorData::I4(v) => (DataType::Int4, pack_int4(&v)),
        };
        TensorProto {
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: Some(elem as i32),
            name: Some(name.to_string()),
            raw_data: Some(raw),
            ..Default::default()
        }
    }
}

/// Two 4-bit codes per byte, the first in the low nibble (ONNX's INT4 layout); an odd count
/// leaves the last high nibble zero.
fn pack_int4(codes: &[i8]) -> Vec<u8> {
    codes
        .chunks(2)
        .map(|pair| {
            let low = pair[0] as u8 & 0x0f;
            let high = pair.get(1).map_or(0, |&c| c as u8 & 0x0f);
            low | (high << 4)
        })
        .collect()
}

fn node(op: &str, inputs: &[&str], outputs: &[&str], attrs: Vec<AttributeProto>) -> NodeProto {
    NodeProto {
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        op_type: Some(op.to_string()),
        attribute: attrs,
        ..Default::default()
    }
}

fn value_info(name: &str, elem: DataType, dims: &[Dim]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| Dimension {
            value: Some(match d {
                Dim::Fixed(n) => dimension::Value::DimValue(*n),
                Dim::Named(s) => dimension::Value::DimParam(s.to_string()),
            }),
            ..Default::default()
        })
        .collect();
    ValueInfoProto {
        name: Some(name.to_string()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(elem as i32),
                shape: Some(TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// An integer attribute.
pub fn int(name: &str, value: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Int as i32),
        i: Some(value),
        ..Default::default()
    }
}

/// An integer-list attribute.
pub fn ints(name: &str, values: &[i64]) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Ints as i32),
        ints: values.to_vec(),
        ..Default::default()
    }
}

/// A float attribute.
pub fn float(name: &str, value: f32) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Float as i32),
        f: Some(value),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int4_codes_pack_low_nibble_first() {
        assert_eq!(pack_int4(&[1, -1, -8, 7, 3]), vec![0xf1, 0x78, 0x03]);
    }

    #[test]
    fn fresh_names_are_unique_and_repeatable() {
        let build = || {
            let mut g = Graph::default();
            let a = g.op("Relu", &["x"], Vec::new());
            let b = g.op("Relu", &[&a], Vec::new());
            (a, b)
        };
        let (a, b) = build();
        assert_ne!(a, b);
        assert_eq!(build(), (a, b));
    }
}
