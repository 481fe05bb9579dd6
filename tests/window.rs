//! The sliding-window self-decoder's receptive field, observed exactly through the public API.
//!
//! A model with `n_layers = 2` has ONE self-decoder layer (sliding-window attention, window `W`)
//! and one cross-decoder layer. With the cross-decoder's attention output projection set to
//! zero, the cross layer adds `0` to its residual stream, so it acts position by position: the
//! logits at position `i` are a fixed function of the self-decoder output at `i` (the same
//! output the global K/V row `i` is computed from), which with one window layer depends exactly
//! on tokens `i-W+1 ..= i`. So changing token `j` must leave every logit row outside
//! `j ..= j+W-1` bit-for-bit unchanged and must change the rows inside it — checked with a full
//! forward, a forward in chunks (5 and 17, W = 8) continuing one cache, and a chunked prefill
//! followed by one-token steps.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use yoco::{Config, Model};

const W: usize = 8;
const T: usize = 64;
const VOCAB: usize = 64;
/// Rows that must not change: identical up to this (they are in fact bit-identical).
const SAME: f32 = 1e-6;
/// Rows that must change: by more than this.
const CHANGED: f32 = 1e-3;

/// Deterministic normal samples (xorshift64* and Box-Muller).
struct Rng(u64);

impl Rng {
    fn uniform(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
        ((x >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    fn normal(&mut self) -> f32 {
        let (u, v) = (self.uniform(), self.uniform());
        ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
    }

    fn below(&mut self, n: usize) -> usize {
        (self.uniform() * n as f64) as usize % n
    }
}

fn config(window: usize) -> Config {
    // Self-decoder head size 16, cross-decoder head size 8 with GQA (4 query heads, 2 kv heads).
    let mut cfg = Config::new(32, 2, 48, 2, 4, 2, VOCAB);
    cfg.sliding_window = Some(window);
    cfg.validate().unwrap();
    assert_eq!(cfg.n_half_layers(), 1);
    cfg
}

/// Random weights under the reference names, with the cross-decoder's attention output zeroed.
fn weights(cfg: &Config, seed: u64) -> HashMap<String, Tensor> {
    let mut rng = Rng(seed);
    cfg.parameters()
        .into_iter()
        .map(|yoco::Parameter { name, shape, .. }| {
            let n: usize = shape.iter().product();
            let values: Vec<f32> = if shape.len() == 1 {
                (0..n).map(|_| 1.0 + 0.1 * rng.normal()).collect()
            } else if name == "cross_decoder.layers.0.mixer.out_proj.weight" {
                vec![0.0; n]
            } else {
                let fan_in = shape[1] as f32;
                let scale = match name.as_str() {
                    "embed_tokens.weight" => 1.0,
                    n if n.contains("q_proj") || n.contains("k_proj") => 1.5 / fan_in.sqrt(),
                    "output_projection.weight" => 3.0 / fan_in.sqrt(),
                    _ => 1.0 / fan_in.sqrt(),
                };
                (0..n).map(|_| scale * rng.normal()).collect()
            };
            let t = Tensor::from_vec(values, shape, &Device::Cpu).unwrap();
            (name, t)
        })
        .collect()
}

fn model(window: usize) -> Model {
    let cfg = config(window);
    // The weights do not depend on the window (SWA has no per-window parameters).
    let vb = VarBuilder::from_tensors(weights(&cfg, 0x5eed), DType::F32, &Device::Cpu);
    Model::new(cfg, vb).unwrap()
}

fn tokens(seed: u64) -> Vec<u32> {
    let mut rng = Rng(seed);
    (0..T).map(|_| rng.below(VOCAB) as u32).collect()
}

fn row_ids(tokens: &[u32]) -> Tensor {
    Tensor::new(tokens, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
}

/// Logits `(T, vocab)` of one forward over all tokens.
fn full(model: &Model, tokens: &[u32]) -> Vec<Option<Tensor>> {
    let mut cache = model.new_cache(1).unwrap();
    let l = model
        .forward(&row_ids(tokens), &mut cache)
        .unwrap()
        .squeeze(0)
        .unwrap();
    (0..tokens.len()).map(|i| Some(l.get(i).unwrap())).collect()
}

/// Logits of forwards over chunks of `chunk` tokens, continuing one cache.
fn chunked(model: &Model, tokens: &[u32], chunk: usize) -> Vec<Option<Tensor>> {
    let mut cache = model.new_cache(1).unwrap();
    let mut rows = Vec::new();
    for part in tokens.chunks(chunk) {
        let l = model
            .forward(&row_ids(part), &mut cache)
            .unwrap()
            .squeeze(0)
            .unwrap();
        rows.extend((0..part.len()).map(|i| Some(l.get(i).unwrap())));
    }
    assert_eq!(cache.positions(), &[tokens.len()]);
    rows
}

/// A prefill of the first `prompt` tokens in chunks of `chunk` (logits of its last position
/// only), then one step per remaining token.
fn prefill_then_step(
    model: &Model,
    tokens: &[u32],
    prompt: usize,
    chunk: usize,
) -> Vec<Option<Tensor>> {
    let mut cache = model.new_cache(1).unwrap();
    let mut rows: Vec<Option<Tensor>> = vec![None; prompt - 1];
    let last = model
        .prefill_chunked(&row_ids(&tokens[..prompt]), &mut cache, chunk)
        .unwrap();
    rows.push(Some(last.squeeze(0).unwrap()));
    for &tok in &tokens[prompt..] {
        let l = model
            .step(&Tensor::new(&[tok], &Device::Cpu).unwrap(), &mut cache)
            .unwrap();
        rows.push(Some(l.squeeze(0).unwrap()));
    }
    rows
}

fn diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// Runs `run` on the tokens and on the tokens with position `j` changed; checks that exactly
/// the rows `j ..= j+window-1` changed. Returns how many rows were compared.
fn check_receptive_field(
    what: &str,
    window: usize,
    toks: &[u32],
    j: usize,
    run: &dyn Fn(&[u32]) -> Vec<Option<Tensor>>,
) -> usize {
    let mut other = toks.to_vec();
    other[j] = (toks[j] + 1 + (j as u32 % 7)) % VOCAB as u32;
    assert_ne!(other[j], toks[j]);
    let (a, b) = (run(toks), run(&other));
    let mut compared = 0;
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        let (Some(x), Some(y)) = (x, y) else { continue };
        compared += 1;
        let d = diff(x, y);
        if i < j || i >= j + window {
            assert!(
                d <= SAME,
                "{what}: token {j} changed row {i} by {d} (window {window})"
            );
        } else {
            assert!(
                d > CHANGED,
                "{what}: token {j} changed row {i} only by {d} (window {window})"
            );
        }
    }
    compared
}

#[test]
fn one_window_layer_sees_exactly_the_last_w_tokens() {
    let model = model(W);
    let toks = tokens(1);
    // Perturbed positions: the first token, and positions whose window straddles chunk
    // boundaries (of 5 and of 17) and the prefill/step boundary.
    for j in [0, 3, 13, 16, 30, 33, 41, 50, T - W, T - 1] {
        let n = check_receptive_field("full forward", W, &toks, j, &|t| full(&model, t));
        assert_eq!(n, T);
        for chunk in [5, 17] {
            let n = check_receptive_field(
                &format!("forward in chunks of {chunk}"),
                W,
                &toks,
                j,
                &|t| chunked(&model, t, chunk),
            );
            assert_eq!(n, T);
            for prompt in [1, 23, 37] {
                let what = format!("prefill {prompt} in chunks of {chunk}, then steps");
                let n = check_receptive_field(&what, W, &toks, j, &|t| {
                    prefill_then_step(&model, t, prompt, chunk)
                });
                assert_eq!(n, T - prompt + 1);
            }
        }
    }
}

#[test]
fn every_way_of_running_gives_the_same_logits() {
    let model = model(W);
    let toks = tokens(2);
    let reference = full(&model, &toks);
    let mut runs = vec![("chunks of 1".to_string(), chunked(&model, &toks, 1))];
    for chunk in [5, 17] {
        runs.push((format!("chunks of {chunk}"), chunked(&model, &toks, chunk)));
        runs.push((
            format!("prefill 30/{chunk} + steps"),
            prefill_then_step(&model, &toks, 30, chunk),
        ));
    }
    for (what, rows) in runs {
        for (i, (x, y)) in reference.iter().zip(&rows).enumerate() {
            if let (Some(x), Some(y)) = (x, y) {
                let d = diff(x, y);
                assert!(
                    d < 1e-4,
                    "{what}: row {i} differs from the full forward by {d}"
                );
            }
        }
    }
}

#[test]
fn the_check_sees_a_window_one_too_large() {
    // Same weights with window W+1: token j now reaches row j+W, which the W-window check
    // requires to be unchanged — so the check above would catch an off-by-one window.
    let wide = model(W + 1);
    let narrow = model(W);
    let toks = tokens(3);
    let j = 20;
    let mut other = toks.clone();
    other[j] = (toks[j] + 5) % VOCAB as u32;
    for (model, window) in [(&wide, W + 1), (&narrow, W)] {
        let (a, b) = (full(model, &toks), full(model, &other));
        let d = diff(a[j + W].as_ref().unwrap(), b[j + W].as_ref().unwrap());
        if window > W {
            assert!(
                d > CHANGED,
                "window {window}: row {} changed only by {d}",
                j + W
            );
        } else {
            assert!(d <= SAME, "window {window}: row {} changed by {d}", j + W);
        }
        // And the wide window's receptive field is exactly W+1.
        check_receptive_field("full forward", window, &toks, j, &|t| full(model, t));
        check_receptive_field("chunks of 5", window, &toks, j, &|t| chunked(model, t, 5));
    }
}
