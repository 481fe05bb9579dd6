//! Shared by the checkpoint targets: a scratch model directory per fuzzing process, and the
//! checks run on a model that loaded.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

/// The scratch directory of this process (set `TMPDIR=/dev/shm` to keep it in memory).
pub fn scratch_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("yoco-fuzz-{}", std::process::id()));
    // Creating an existing directory is fine; any other failure shows in the writes below.
    let _ = std::fs::create_dir_all(&dir);
    dir
}

/// Writes `files` (name, bytes) into the scratch directory, removing the weight files of the
/// previous input first, and returns the directory.
pub fn model_dir(files: &[(&str, &[u8])]) -> PathBuf {
    let dir = scratch_dir();
    for old in ["model.safetensors", "checkpoint.pth", "params.json", "model.gguf"] {
        let _ = std::fs::remove_file(dir.join(old));
    }
    for (name, bytes) in files {
        if std::fs::write(dir.join(name), bytes).is_err() {
            // A full disk is the harness's problem, not a finding.
            std::process::exit(0);
        }
    }
    dir
}

/// libFuzzer's panic hook aborts at once, even for a panic that yoco catches on purpose (candle's
/// pickle reader panics on malformed tensor records; yoco's loader turns that into an error). The
/// default hook lets those be caught; a panic that escapes yoco still reaches libfuzzer-sys's
/// `catch_unwind` around the target, which aborts and reports it.
pub fn default_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| drop(std::panic::take_hook()));
}

/// Loads the directory; when it loads, runs one short forward pass. Errors are the expected
/// outcome for most inputs; panics, aborts, overflows and huge allocations are the findings.
pub fn load_and_run(dir: &std::path::Path) {
    default_panic_hook();
    let device = Device::Cpu;
    let Ok(model) = yoco::Model::load(dir, &device, DType::F32) else {
        return;
    };
    let Ok(mut cache) = model.new_cache(1) else {
        return;
    };
    if let Ok(ids) = Tensor::new(&[[0u32, 1]], &device) {
        let _ = model.forward(&ids, &mut cache);
    }
}
