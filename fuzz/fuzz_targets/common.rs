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
    for old in ["model.safetensors", "checkpoint.pth", "params.json"] {
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

/// Loads the directory; when it loads, runs one short forward pass. Errors are the expected
/// outcome for most inputs; panics, aborts, overflows and huge allocations are the findings.
pub fn load_and_run(dir: &std::path::Path) {
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
