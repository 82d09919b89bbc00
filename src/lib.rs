//! axcompress: significance-driven compression of fine-tuned BERT-family models.
//!
//! The pipeline, as the folders show it: [`model`] loads a checkpoint into the one runtime every
//! command shares (its compute [`kernels`], the weight [`formats`] and the tokenizer in
//! [`text`]); [`data`] finds, splits and batches the task's data; [`scoring`] judges a model on
//! labelled data; [`analyze`] measures the significance of blocks, heads and FFN groups;
//! [`passes`] are the compression stages on one selection engine, each with its settings
//! declared once ([`settings`]); [`pipeline`] chains them under one tolerance; [`export`] writes
//! the result. [`evaluate`] and [`measure`] measure any model; [`commands`] holds each
//! subcommand's thin entry point and [`config_file`] the `compress` configs. The library denies
//! undocumented public items (`missing_docs`, an error under CI's `-D warnings`).

#![warn(missing_docs)]

pub mod analyze;
pub mod cli;
pub mod commands;
pub mod config_file;
pub mod data;
pub mod evaluate;
pub mod export;
pub mod formats;
pub mod fsutil;
pub mod hash;
pub mod interrupt;
pub mod kernels;
pub mod measure;
pub mod memory;
pub mod model;
pub mod passes;
pub mod pipeline;
pub mod progress;
pub mod scoring;
pub mod settings;
pub mod setup;
#[cfg(test)]
mod testing;
pub mod text;
pub mod threads;
pub mod train;
