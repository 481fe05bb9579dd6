//! Loading a torch `checkpoint.pth` (zip + pickle) for a fixed tiny config.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

/// The config of the seed corpus (tools/make_fuzz_corpus.py).
const PARAMS: &str = r#"{"dim": 8, "n_layers": 2, "hidden_dim": 16, "n_self_heads": 2,
"n_attn_heads": 2, "n_attn_kv_heads": 1, "vocab_size": 16}"#;

fuzz_target!(|data: &[u8]| {
    let dir = common::model_dir(&[("params.json", PARAMS.as_bytes()), ("checkpoint.pth", data)]);
    common::load_and_run(&dir);
});
