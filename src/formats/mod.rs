//! How weights are stored, in memory and on disk: quantized codes and their execution
//! ([`quant`]), magnitude-striped sparse matrices ([`striped`]), and the compressed-tensors
//! convention the files use ([`compressed_tensors`]). Loading ([`crate::model`]) reads them and
//! export ([`crate::export`]) writes them.

pub mod compressed_tensors;
pub mod quant;
pub mod striped;
