//! Text → token ids: the tokenizer a model ships with ([`tokenizer`]) and vocabulary pruning's
//! rewrite of its files ([`vocab`]).

pub mod tokenizer;
pub mod vocab;
