//! Entry points for the crate's own benchmarks (`benches/`), which see only the public API:
//! not a stable interface.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::Tensor;

use crate::cache::FamilyState;
use crate::kernels::isa::{Isa, Level};
use crate::kernels::quantized::QWeight;
use crate::models::phi4flash::model::Phi4FlashState;
use crate::{Cache, Error, Model, ModelConfig, Result};

/// A quantized weight laid out as a linear layer of a model loaded on the CPU holds it (Q8_0
/// rows interleaved where the kernels have byte dot products).
pub struct PreparedWeight(Arc<QWeight>);

/// `w` as a quantized linear layer on the CPU holds it, for [`active_isa`]'s kernels.
pub fn prepare(w: Arc<QTensor>) -> Result<PreparedWeight> {
    Ok(PreparedWeight(Arc::new(QWeight::prepared(
        w,
        Isa::active(),
    )?)))
}

/// `x W^T` through the CPU decode kernel of quantized projections (what a quantized linear
/// layer runs for up to 64 rows), on the instruction set the kernels run on (see
/// [`active_isa`]); `None` where that kernel declines the case.
pub fn quantized_decode(x: &Tensor, w: &PreparedWeight) -> Result<Option<Tensor>> {
    crate::kernels::quantized::qgemv_cpu(x, std::slice::from_ref(&w.0))
}

/// The instruction set the CPU kernels run on: `"avx512"`, `"avx2-vnni"` (AVX2 with
/// AVX-VNNI), `"avx2"` or `"portable"` (the CPU's best, lowered by the environment variable
/// `YOCO_CPU_ISA`).
pub fn active_isa() -> &'static str {
    let isa = Isa::active();
    match isa.level() {
        Level::Avx512 => "avx512",
        Level::Avx2 if isa.avx_vnni() => "avx2-vnni",
        Level::Avx2 => "avx2",
        Level::Portable => "portable",
    }
}

/// Global K/V positions written per call while filling: the transient is one chunk's, as in a
/// prefill of the default chunk.
const FILL_CHUNK: usize = 512;

/// Fills an empty Phi-4-mini-flash `cache` as if `len` tokens had been prefilled, with random
/// values in place of what a prompt would leave: every Mamba layer's conv and SSM states, the
/// last `W - 1` keys and values of every windowed layer, and `len` positions of the global K/V.
/// For timing decode at long contexts without their prompt (a 32K prompt takes many minutes on
/// a small CPU); the values mean nothing, the shapes and the work a step does are a prefill's.
///
/// The global K/V is written in chunks into whatever room [`Cache::reserve`] made, so call that
/// first (for `len` plus the steps to come) and memory peaks as a prefill's would.
pub fn fill_phi4flash_cache(model: &Model, cache: &mut Cache, len: usize) -> Result<()> {
    let ModelConfig::Phi4Flash(cfg) = model.config() else {
        return Err(Error::Input(
            "fill_phi4flash_cache needs a Phi-4-mini-flash model".into(),
        ));
    };
    let FamilyState::Phi4Flash(empty) = &cache.state else {
        return Err(Error::Input(
            "fill_phi4flash_cache needs a Phi-4-mini-flash cache".into(),
        ));
    };
    if cache.positions().iter().any(|&p| p != 0) {
        return Err(Error::Input(
            "fill_phi4flash_cache needs an empty cache".into(),
        ));
    }
    let (dtype, device) = (model.dtype(), model.device());
    let batch = cache.batch_size();
    // The window and the global K/V hold pairs of heads (differential attention).
    let shape = (batch, cfg.num_key_value_heads / 2, 2 * cfg.head_dim());
    let random = |dims: &[usize]| -> Result<Tensor> {
        Ok(Tensor::randn(0f32, 1.0, dims, device)?.to_dtype(dtype)?)
    };

    // The constant-size state goes through the saved-cache format, which checks every shape
    // against the empty state: random Mamba states, and W - 1 window entries per layer (all
    // a window keeps, whatever the length before it).
    let mut file = HashMap::new();
    empty.save(&mut file)?;
    let kept = cfg.sliding_window.saturating_sub(1).min(len);
    for (name, t) in file.iter_mut() {
        if name.starts_with("mamba.") {
            *t = Tensor::randn(0f32, 1.0, t.dims(), t.device())?;
        } else if name.ends_with(".filled") {
            *t = Tensor::new(vec![kept as u32; batch].as_slice(), t.device())?;
        } else {
            *t = random(&[shape.0, shape.1, kept, shape.2])?;
        }
    }
    let window = (empty.window.n_layers(), shape, cfg.sliding_window);
    let state = Phi4FlashState::load(&file, empty, window, dtype, device)?;
    cache.state = FamilyState::Phi4Flash(state);

    let mut filled = 0;
    while filled < len {
        let c = FILL_CHUNK.min(len - filled);
        let dims = [shape.0, shape.1, c, shape.2];
        cache.global.append((random(&dims)?, random(&dims)?))?;
        filled += c;
    }
    Ok(())
}

/// `x W^T` for a prompt chunk (`x: (m, k)` f32 rows) through the CPU path of a quantized linear
/// layer past the decode kernel's rows; `None` for a format that path does not read.
pub fn quantized_prefill(x: &[f32], m: usize, w: &PreparedWeight) -> Result<Option<Vec<f32>>> {
    crate::kernels::quantized::prefill_product_cpu(x, m, std::slice::from_ref(&w.0))
}

/// A quantized CPU weight `(n, k)` as f32 (in parallel), as a prompt chunk's product reads it.
pub fn dequantize(w: &PreparedWeight) -> Result<Tensor> {
    crate::kernels::quantized::dequantize_cpu(&w.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{LoadOptions, Phi4FlashConfig};

    /// A filled cache holds what a prefill of the same length leaves (every part, the same
    /// bytes, the same position), and decoding continues from it.
    #[test]
    fn a_filled_cache_is_shaped_as_a_prefilled_one_and_decodes() -> Result<()> {
        let cfg = Phi4FlashConfig {
            hidden_size: 64,
            intermediate_size: 128,
            num_hidden_layers: 8,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            vocab_size: 97,
            sliding_window: 16,
            max_positions: 256,
            ..Phi4FlashConfig::phi4_mini_flash()
        };
        let model = Model::random_phi4flash(&cfg, &LoadOptions::default())?;
        let len = 100;
        let ids: Vec<u32> = (0..len as u32).map(|i| i * 7 % 97).collect();
        let mut prefilled = model.new_cache(1)?;
        model.prefill(
            &Tensor::new(ids.as_slice(), model.device())?.unsqueeze(0)?,
            &mut prefilled,
        )?;
        let mut filled = model.new_cache(1)?;
        filled.reserve(len + 1)?;
        fill_phi4flash_cache(&model, &mut filled, len)?;
        assert_eq!(filled.positions(), prefilled.positions());
        assert_eq!(filled.global_kv_bytes(), prefilled.global_kv_bytes());
        assert_eq!(filled.self_state_bytes(), prefilled.self_state_bytes());
        assert!(fill_phi4flash_cache(&model, &mut filled, 1).is_err());
        let logits = model.step(&Tensor::new(&[3u32], model.device())?, &mut filled)?;
        assert_eq!(logits.dims(), &[1, 97]);
        let values: Vec<f32> = logits.flatten_all()?.to_vec1()?;
        assert!(values.iter().all(|x| x.is_finite()));
        assert_eq!(filled.positions(), &[len + 1]);
        Ok(())
    }
}
