//! The float precision a model is written in (`--dtype`): the in-memory model is rounded to it
//! before it is judged, so that every figure a run reports is the written model's.

use anyhow::Result;
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::linear::{Linear, Weight};
use super::nn::LayerNorm;
use super::Model;

/// A float precision for the written weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum StorageDtype {
    /// 32-bit floats.
    Float32,
    /// IEEE half precision (what most Hugging Face checkpoints ship in).
    Float16,
    /// bfloat16.
    Bfloat16,
}

impl StorageDtype {
    /// The precision a candle float dtype is written in (f32 for anything that is not a
    /// half-precision float).
    pub fn of(dtype: DType) -> Self {
        match dtype {
            DType::F16 => StorageDtype::Float16,
            DType::BF16 => StorageDtype::Bfloat16,
            _ => StorageDtype::Float32,
        }
    }

    /// The Hugging Face name (`float16`), as in config.json and in axcompress configs.
    pub fn name(self) -> &'static str {
        match self {
            StorageDtype::Float32 => "float32",
            StorageDtype::Float16 => "float16",
            StorageDtype::Bfloat16 => "bfloat16",
        }
    }

    /// The candle dtype.
    pub fn dtype(self) -> DType {
        match self {
            StorageDtype::Float32 => DType::F32,
            StorageDtype::Float16 => DType::F16,
            StorageDtype::Bfloat16 => DType::BF16,
        }
    }
}

impl Model {
    /// The model as it reads back once written in `dtype`: every float tensor rounded to it
    /// (computation stays f32), and `dtype` the precision it is written in. Quantized matrices
    /// keep their own storage.
    pub fn stored_as(&self, dtype: StorageDtype) -> Result<Model> {
        let dtype = dtype.dtype();
        let round = |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(dtype)?.to_dtype(DType::F32)?) };
        let linear = |l: &mut Linear| -> Result<()> {
            if let Weight::Dense(w) = &l.weight {
                l.weight = Weight::Dense(round(w)?);
            }
            l.bias = round(&l.bias)?;
            Ok(())
        };
        let norm = |n: &mut LayerNorm| -> Result<()> {
            n.weight = round(&n.weight)?;
            n.bias = round(&n.bias)?;
            Ok(())
        };
        let mut out = self.clone();
        let e = &mut out.embeddings;
        if let Weight::Dense(w) = &e.word {
            e.word = Weight::Dense(round(w)?);
        }
        e.position = round(&e.position)?;
        e.token_type = e.token_type.as_ref().map(round).transpose()?;
        norm(&mut e.norm)?;
        for layer in &mut out.layers {
            if let Some(a) = &mut layer.attention {
                linear(&mut a.qkv)?;
                linear(&mut a.output)?;
                norm(&mut a.norm)?;
            }
            if let Some(f) = &mut layer.ffn {
                linear(&mut f.intermediate)?;
                linear(&mut f.output)?;
                norm(&mut f.norm)?;
            }
        }
        linear(&mut out.head.dense)?;
        linear(&mut out.head.out)?;
        out.storage_dtype = dtype;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::random_model;

    #[test]
    fn rounding_to_a_dtype_is_idempotent_and_sets_the_written_precision() {
        let model = random_model("bert", 2, 2, 4, 8);
        let half = model.stored_as(StorageDtype::Float16).unwrap();
        assert_eq!(half.storage_dtype, DType::F16);
        let again = half.stored_as(StorageDtype::Float16).unwrap();
        let values = |m: &Model| -> Vec<f32> {
            let w = m.layers[1]
                .ffn
                .as_ref()
                .unwrap()
                .output
                .weight
                .to_dense()
                .unwrap();
            w.flatten_all().unwrap().to_vec1().unwrap()
        };
        assert_eq!(values(&half), values(&again));
        assert_ne!(values(&half), values(&model), "fp16 rounds these values");
        let back = model.stored_as(StorageDtype::Float32).unwrap();
        assert_eq!(values(&back), values(&model));
    }
}
