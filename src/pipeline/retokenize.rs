//! After a stage that changes the tokenizer (vocabulary pruning): the run's data encoded anew
//! with the model's new tokenizer, so that the compressed model is judged exactly as it will run
//! (a text outside the pruned vocabulary's corpus may now hold `[UNK]`s).

use anyhow::Result;

use super::evaluation::ModelOnData;
use super::{read_test, RunSettings};
use crate::data::batch::EncodedSet;
use crate::data::splits::Splits;
use crate::model::Model;
use crate::setup::TaskSetup;

/// The run's data as a retokenized model's own tokenizer encodes it: the same examples, with the
/// same labels, in the same order.
pub struct Reencoded {
    /// Selection, report, dev and check.
    pub splits: Splits,
    /// `--test`.
    pub test: Option<EncodedSet>,
}

impl Reencoded {
    /// `model` with this data, for the judge.
    pub fn subject<'a>(&'a self, model: &'a Model) -> ModelOnData<'a> {
        ModelOnData {
            model,
            splits: &self.splits,
            test: self.test.as_ref(),
        }
    }
}

/// Encodes the run's `splits` anew with `model`'s tokenizer. A selection and a check split
/// labelled by the input model keep the labels it gave.
pub fn encode_anew(
    model: &Model,
    spec: &RunSettings,
    setup: &TaskSetup,
    splits: &Splits,
) -> Result<Reencoded> {
    let encoder = model.text_encoder(setup.max_length)?;
    let same_labels = |_: &EncodedSet| Ok(splits.selection.set.targets.clone());
    let new_splits = Splits::load(&spec.selection, &setup.data, &encoder, &same_labels)?;
    let new_splits = match &splits.check {
        Some(check) => {
            let same_check_labels = |_: &EncodedSet| Ok(check.set.targets.clone());
            new_splits.with_check(&spec.selection, &setup.data, &encoder, &same_check_labels)?
        }
        None => new_splits,
    };
    let test = spec
        .test
        .as_deref()
        .map(|p| read_test(spec.task, p, &encoder))
        .transpose()?;
    Ok(Reencoded {
        splits: new_splits,
        test,
    })
}
