//! The significance report that `--significance` reads, on arbitrary bytes: parsed, then its
//! elements checked against MiniLM-L6's structure, as prune and quantize check them.
#![no_main]

use std::path::Path;

use axcompress::analyze::report::Report;
use axcompress::fsutil::text_from_bytes;
use axcompress::model::structure::Structure;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = text_from_bytes("report.json", data.to_vec()) else {
        return;
    };
    let path = Path::new("report.json");
    if let Ok(report) = Report::parse(&text, path) {
        let _ = report.check_elements(&Structure::uniform(6, 12, 32, 1536), path);
    }
});
