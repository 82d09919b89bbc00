//! axcompress: significance-driven compression of fine-tuned BERT-family models.
//!
//! The pipeline: [`model`] loads a checkpoint into the one runtime every command shares, [`data`]
//! loads and batches task data, [`evaluate`] runs and scores it, and [`commands`] holds the
//! entry point of each subcommand.

pub mod analyze;
pub mod bench;
pub mod cli;
pub mod commands;
pub mod data;
pub mod evaluate;
pub mod export;
pub mod fsutil;
pub mod model;
pub mod passes;
pub mod progress;
