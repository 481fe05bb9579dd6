//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

use candle_core::{Device, Tensor};

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The reference's token ids and logits for a fixture (shared by folders with the same weights).
pub struct Expected {
    pub tokens: Vec<u32>,
    pub logits: Tensor,
    pub halfsplit: Tensor,
    pub standard_freqs: Tensor,
}

pub fn expected(name: &str) -> Expected {
    let path = fixture(name).join("expected.safetensors");
    let t = candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let tokens: Vec<i64> = t["tokens"].to_vec1().unwrap();
    Expected {
        tokens: tokens.into_iter().map(|x| x as u32).collect(),
        logits: t["logits"].clone(),
        halfsplit: t["logits_halfsplit_rope"].clone(),
        standard_freqs: t["logits_standard_freqs"].clone(),
    }
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

pub fn ids(tokens: &[u32]) -> Tensor {
    Tensor::new(tokens, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
}
