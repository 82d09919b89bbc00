//! Judging a model on labelled data, in one vocabulary every stage shares: the run's [`goal`], the labelled
//! [`batch`]es, the [`scorer`] that turns logits into losses, predictions and metrics, the
//! [`score`] a candidate gets on the selection data with the [`Rule`](score::Rule) that accepts
//! it, and the statistical [`guard`] that bounds its drop against the original.

pub mod batch;
pub mod goal;
pub mod guard;
pub mod score;
pub mod scorer;
