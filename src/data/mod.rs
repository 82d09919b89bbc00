//! Task data: the GLUE task registry, TSV and hub parquet readers, label mapping, batching and
//! metrics.

pub mod batch;
pub mod glue;
pub mod hub;
pub mod labels;
pub mod metric;
pub mod sample;
pub mod task;
