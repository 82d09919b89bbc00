//! Classification / regression heads of the three families: `CLS → dense → act → dense`.

use candle_core::{IndexOp, Result, Tensor};

use super::config::Family;
use super::linear::Linear;

/// The head applied to the first token's hidden state.
#[derive(Debug, Clone)]
pub struct ClassifierHead {
    /// BERT pooler dense, RoBERTa `classifier.dense`, DistilBERT `pre_classifier`.
    pub dense: Linear,
    /// BERT `classifier`, RoBERTa `classifier.out_proj`, DistilBERT `classifier`.
    pub out: Linear,
    /// Family decides the activation between the two (tanh, or ReLU for DistilBERT).
    pub family: Family,
}

impl ClassifierHead {
    /// Hugging Face names of (dense, out) for a family, without the base-model prefix.
    pub fn tensor_names(family: Family) -> (&'static str, &'static str) {
        match family {
            Family::Bert => ("pooler.dense", "classifier"),
            Family::Roberta => ("classifier.dense", "classifier.out_proj"),
            Family::DistilBert => ("pre_classifier", "classifier"),
        }
    }

    /// Maps `[batch, seq, hidden]` to logits `[batch, labels]`.
    pub fn forward(&self, hidden: &Tensor) -> Result<Tensor> {
        let cls = hidden.i((.., 0, ..))?;
        let h = self.dense.forward(&cls)?;
        let h = match self.family {
            Family::DistilBert => h.relu()?,
            _ => h.tanh()?,
        };
        self.out.forward(&h)
    }
}
