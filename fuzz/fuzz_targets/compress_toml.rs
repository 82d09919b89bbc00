//! The `compress` TOML config, on arbitrary bytes.
#![no_main]

use std::path::Path;

use axcompress::config_file;
use axcompress::fsutil::text_from_bytes;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = text_from_bytes("fuzz.toml", data.to_vec()) else {
        return;
    };
    let _ = config_file::parse(&text, Path::new("configs/fuzz.toml"));
});
