//! Exactness against the official YOCO implementation itself (microsoft/unilm, `YOCO/`): the
//! fixtures in `tests/fixtures/official/` were computed by the official code (float32, CPU) from
//! checkpoints saved with its own `state_dict()` names. These are the crate's primary exactness
//! tests; `tests/parity.rs` (an independent NumPy reference) is the second, independent check.

mod common;

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use common::{ids, max_abs_diff};
use yoco::{GenerationConfig, Kernels, LoadOptions, Model};

/// The official code's own float32 forms differ by ~1e-6; a port is exact within 1e-4.
const TOL: f32 = 1e-4;

const CASES: [&str; 2] = ["gret_gqa", "swa_w24"];

struct Case {
    model: Model,
    tokens: Vec<u32>,
    /// `(T, vocab)`: the official full forward over all tokens.
    logits: Tensor,
    prompt_len: usize,
    /// The official greedy loop's new tokens after `tokens[..prompt_len]`.
    greedy: Vec<u32>,
}

fn dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/official")
        .join(name)
}

fn u32s(t: &Tensor) -> Vec<u32> {
    t.to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|x| u32::try_from(x).unwrap())
        .collect()
}

/// Every case, loaded with the CPU's native kernels and with the portable ones (the tensor ops a
/// GPU runs): both must be exact.
fn cases() -> Vec<(String, Case)> {
    let mut out = Vec::new();
    for name in CASES {
        for kernels in [Kernels::Native, Kernels::Portable] {
            out.push((format!("{name} ({kernels:?})"), case(name, kernels)));
        }
    }
    out
}

fn case(name: &str, kernels: Kernels) -> Case {
    // `Model::load` on the directory exactly as the official code saved it: no renaming.
    let model = if kernels == Kernels::Native {
        Model::load(dir(name), &Device::Cpu, DType::F32)
    } else {
        let options = LoadOptions {
            kernels,
            ..LoadOptions::default()
        };
        Model::load_with(dir(name), &options)
    }
    .unwrap_or_else(|e| panic!("{name}: the official checkpoint must load: {e}"));
    let exp = candle_core::safetensors::load(dir(name).join("expected.safetensors"), &Device::Cpu)
        .unwrap();
    let prompt_len = u32s(&exp["prompt_len"])[0] as usize;
    Case {
        model,
        tokens: u32s(&exp["tokens"]),
        logits: exp["logits"].clone(),
        prompt_len,
        greedy: u32s(&exp["greedy"]),
    }
}

#[test]
fn official_checkpoints_give_the_official_logits() {
    for (name, c) in cases() {
        let mut cache = c.model.new_cache(1).unwrap();
        let logits = c
            .model
            .forward(&ids(&c.tokens), &mut cache)
            .unwrap()
            .squeeze(0)
            .unwrap();
        let diff = max_abs_diff(&logits, &c.logits);
        eprintln!("{name}: full forward max |diff| against the official code = {diff:.2e}");
        assert!(diff <= TOL, "{name}: max |logits - official| = {diff}");
    }
}

/// Prefill the first `split` tokens in chunks of `chunk`, then step one token at a time: every
/// position's logits equal the official full forward's.
#[test]
fn chunked_prefill_then_steps_give_the_official_logits() {
    for (name, c) in cases() {
        let t = c.tokens.len();
        for chunk in [1, 7, 64, 256] {
            // A split that is not a multiple of the chunk, and long enough to cross the
            // reference's 256-token retention chunk where the fixture allows.
            let split = (t - 12).min(chunk * 3 + 5);
            let mut cache = c.model.new_cache(1).unwrap();
            let last = c
                .model
                .prefill_chunked(&ids(&c.tokens[..split]), &mut cache, chunk)
                .unwrap();
            let diff = max_abs_diff(&last, &c.logits.narrow(0, split - 1, 1).unwrap());
            assert!(diff <= TOL, "{name} chunk {chunk}: prefill {split}: {diff}");
            for pos in split..t {
                let step = c
                    .model
                    .step(
                        &Tensor::new(&[c.tokens[pos]], &Device::Cpu).unwrap(),
                        &mut cache,
                    )
                    .unwrap();
                let diff = max_abs_diff(&step, &c.logits.narrow(0, pos, 1).unwrap());
                assert!(diff <= TOL, "{name} chunk {chunk}: step at {pos}: {diff}");
            }
        }
    }
}

#[test]
fn greedy_generation_gives_the_official_tokens() {
    for (name, c) in cases() {
        // The official greedy loop: ids 0 and 1 masked, no stop token, a fixed number of steps.
        let cfg = GenerationConfig {
            stop_tokens: vec![],
            suppress_tokens: vec![0, 1],
            ..GenerationConfig::greedy(c.greedy.len())
        };
        let out = c.model.generate(&c.tokens[..c.prompt_len], &cfg).unwrap();
        assert_eq!(out.tokens, c.greedy, "{name}");
    }
}

/// `Model::prompt_logprobs` (chunk by chunk, never all the logits at once) against the official
/// code's logits: each token's log-probability is log_softmax of the logits before it.
#[test]
fn prompt_logprobs_equal_the_official_log_softmax() {
    for (name, c) in cases() {
        let lps = c.model.prompt_logprobs(&c.tokens, 3).unwrap();
        assert_eq!(lps.len(), c.tokens.len());
        assert!(lps[0].is_none());
        let want = candle_nn::ops::log_softmax(&c.logits, candle_core::D::Minus1)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for t in 1..c.tokens.len() {
            let lp = lps[t].as_ref().unwrap();
            assert_eq!(lp.token, c.tokens[t]);
            let w = want[t - 1][c.tokens[t] as usize];
            assert!(
                (lp.logprob - w).abs() <= TOL,
                "{name} at {t}: {} vs {w}",
                lp.logprob
            );
            // The alternatives are the three best of that row, best first.
            let mut best: Vec<(usize, f32)> = want[t - 1].iter().copied().enumerate().collect();
            best.sort_by(|a, b| b.1.total_cmp(&a.1));
            assert_eq!(lp.top.len(), 3);
            for (&(_, v), &(_, wv)) in lp.top.iter().zip(&best) {
                assert!((v - wv).abs() <= TOL, "{name} at {t}");
            }
            if best[0].1 - best[1].1 > 1e-3 {
                assert_eq!(lp.top[0].0 as usize, best[0].0, "{name} at {t}");
            }
        }
    }
}
