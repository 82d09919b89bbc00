//! The GLUE TSV reader of every task, on arbitrary bytes: an error or examples, never a panic.
#![no_main]

use axcompress::data::glue;
use axcompress::data::task::Task;
use axcompress::fsutil::text_from_bytes;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = text_from_bytes("fuzz.tsv", data.to_vec()) else {
        return;
    };
    for task in Task::ALL {
        if let Ok(examples) = glue::parse(task, &text, "fuzz.tsv") {
            assert!(!examples.is_empty());
        }
    }
});
