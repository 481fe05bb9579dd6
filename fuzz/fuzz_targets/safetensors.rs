//! Loading a safetensors checkpoint. The input is `[json length: u16 LE][params.json][model.safetensors]`,
//! so the fuzzer mutates the config and the file header together (shapes that disagree, offsets
//! past the end, dtypes, duplicate or missing names).
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let Some((len, rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let len = u16::from_le_bytes(*len) as usize;
    if len > rest.len() {
        return;
    }
    let (json, weights) = rest.split_at(len);
    let dir = common::model_dir(&[("params.json", json), ("model.safetensors", weights)]);
    common::load_and_run(&dir);
});
