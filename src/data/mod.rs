//! Task data: the GLUE task registry, where the data comes from (`--data`, `$GLUE_DIR`, the hub
//! dataset), TSV and parquet readers, the selection / report splits, label mapping, batching and
//! metrics.

pub mod batch;
pub mod glue;
pub mod hub;
pub mod labels;
pub mod metric;
pub mod perturb;
pub mod sample;
pub mod source;
pub mod splits;
pub mod task;
