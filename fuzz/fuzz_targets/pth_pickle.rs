//! The pickle inside a `checkpoint.pth`: the input is `data.pkl` itself, wrapped here into a
//! well-formed zip (the `pth` target's mutations mostly break the zip's CRCs before the pickle is
//! parsed), next to the tensor data of the seed checkpoint.
#![no_main]

use std::io::{Cursor, Read, Write};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

/// Same tiny config as the `pth` target.
const PARAMS: &str = r#"{"dim": 8, "n_layers": 2, "hidden_dim": 16, "n_self_heads": 2,
"n_attn_heads": 2, "n_attn_kv_heads": 1, "vocab_size": 16}"#;

/// The seed checkpoint's entries other than `data.pkl` (name, bytes), and its pickle's name.
fn seed_entries() -> &'static (Vec<(String, Vec<u8>)>, String) {
    static ENTRIES: OnceLock<(Vec<(String, Vec<u8>)>, String)> = OnceLock::new();
    ENTRIES.get_or_init(|| {
        let mut entries = Vec::new();
        let mut pickle_name = "checkpoint/data.pkl".to_string();
        let seed = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/pth/tiny");
        let Ok(bytes) = std::fs::read(seed) else {
            return (entries, pickle_name);
        };
        let Ok(mut archive) = zip::ZipArchive::new(Cursor::new(bytes)) else {
            return (entries, pickle_name);
        };
        for i in 0..archive.len() {
            let Ok(mut entry) = archive.by_index(i) else {
                continue;
            };
            let Ok(name) = entry.name().map(|n| n.into_owned()) else {
                continue;
            };
            let mut data = Vec::new();
            if entry.read_to_end(&mut data).is_err() {
                continue;
            }
            if name.ends_with("data.pkl") {
                pickle_name = name;
            } else {
                entries.push((name, data));
            }
        }
        (entries, pickle_name)
    })
}

fuzz_target!(|pickle: &[u8]| {
    let (entries, pickle_name) = seed_entries();
    let mut out = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let stored =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    if out.start_file(pickle_name.as_str(), stored).is_err() || out.write_all(pickle).is_err() {
        return;
    }
    for (name, data) in entries {
        if out.start_file(name.as_str(), stored).is_err() || out.write_all(data).is_err() {
            return;
        }
    }
    let Ok(zip) = out.finish() else { return };
    let dir = common::model_dir(&[
        ("params.json", PARAMS.as_bytes()),
        ("checkpoint.pth", &zip.into_inner()),
    ]);
    common::load_and_run(&dir);
});
