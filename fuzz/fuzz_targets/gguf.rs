//! Loading a `model.gguf` (config in its metadata, tensors float or quantized): the header walk
//! and its checks before allocation (counts, string and array lengths, dimensions, types,
//! alignment, offsets and sizes against the file), the config from the metadata, the tensors
//! against the catalogue, candle's reading of the data, and one forward pass (through the
//! quantized decode kernel when the projections are quantized).
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let dir = common::model_dir(&[("model.gguf", data)]);
    common::load_and_run(&dir);
});
