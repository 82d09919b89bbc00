//! The pickle bound of `pytorch_model.bin` (model/pickle_guard.rs) on arbitrary bytes: it
//! returns a verdict (or leaves the bytes to candle) and never panics, recurses or allocates
//! without bound.
#![no_main]

use axcompress::model::pickle_guard::check_pickle;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = check_pickle(data);
});
