//! Compression passes: each takes a model and returns a new one (the input is never changed).

pub mod prune;
