//! The model's insides against the fixtures computed by Phi-4-mini-flash's own reference code
//! (`tests/fixtures/phi4flash/`): every layer's output, the final norm, the GMU memory, the
//! shared K/V, and the caches after the prompt and after the greedy continuation. The logits and
//! tokens are checked through the public API in `tests/phi4flash.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use crate::cache::FamilyState;
use crate::{Cache, Kernels, LoadOptions, Model};

const CASES: [&str; 2] = ["a_l8_w4", "b_l12_w8"];

fn dir(case: &str) -> String {
    format!(
        "{}/tests/fixtures/phi4flash/{case}",
        env!("CARGO_MANIFEST_DIR")
    )
}

fn expected(case: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(format!("{}/expected.safetensors", dir(case)), &Device::Cpu)
        .unwrap()
}

fn load(case: &str, kernels: Kernels) -> Model {
    let options = LoadOptions {
        kernels,
        ..LoadOptions::default()
    };
    Model::load_with(dir(case), &options).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn close(what: &str, got: &Tensor, want: &Tensor, tol: f32) {
    let d = max_diff(&got.to_dtype(DType::F32).unwrap(), want);
    assert!(d <= tol, "{what}: max |diff| {d} > {tol}");
}

/// yoco's K/V pairs `(1, H_kv/2, L, 2 hd)` in the reference's layout `(H_kv, L, hd)`.
fn heads_of_pairs(t: &Tensor) -> Tensor {
    let (_, m, l, w) = t.dims4().unwrap();
    t.reshape((m, l, 2, w / 2))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .reshape((2 * m, l, w / 2))
        .unwrap()
}

/// Every cached tensor of `cache` against `{prefix}.{layer}.*` of the fixture.
fn compare_cache(case: &str, cache: &Cache, want: &HashMap<String, Tensor>, prefix: &str) {
    let FamilyState::Phi4Flash(state) = &cache.state else {
        panic!("not a Phi-4-mini-flash cache")
    };
    let mut window = HashMap::new();
    state.window.save(&mut window).unwrap();
    let mut global = HashMap::new();
    cache.global.save(&mut global).unwrap();
    let layers = state.mamba.len() * 2 - 1;
    let (mut mamba, mut windowed) = (0, 0);
    for layer in 0..=layers {
        let name = |x: &str| format!("{prefix}.{layer}.{x}");
        if layer % 2 == 0 {
            let (conv, ssm) = state.mamba[mamba].tensors();
            mamba += 1;
            // The reference keeps K raw inputs (E, K); yoco the last K - 1, time-major.
            let ref_conv = &want[&name("conv_state")];
            let k = ref_conv.dim(1).unwrap();
            let ref_conv = ref_conv.narrow(1, 1, k - 1).unwrap().t().unwrap();
            close(
                &format!("{case} {}", name("conv")),
                &conv.squeeze(0).unwrap(),
                &ref_conv,
                5e-5,
            );
            close(
                &format!("{case} {}", name("ssm")),
                &ssm.squeeze(0).unwrap(),
                &want[&name("ssm_state")],
                5e-5,
            );
        } else if layer < layers {
            // The reference keeps the last W keys; yoco the last W - 1 (the next query's own key
            // completes its window).
            let k = heads_of_pairs(&window[&format!("layers.{windowed}.k")]);
            let v = heads_of_pairs(&window[&format!("layers.{windowed}.v")]);
            windowed += 1;
            let ref_k = &want[&name("key")];
            let n = k.dim(1).unwrap();
            let w = ref_k.dim(1).unwrap();
            assert_eq!(n, w - 1, "{case} {}", name("key"));
            close(&name("key"), &k, &ref_k.narrow(1, w - n, n).unwrap(), 5e-5);
            close(
                &name("value"),
                &v,
                &want[&name("value")].narrow(1, w - n, n).unwrap(),
                5e-5,
            );
        } else {
            close(
                &name("key"),
                &heads_of_pairs(&global["global.k"]),
                &want[&name("key")],
                5e-5,
            );
            close(
                &name("value"),
                &heads_of_pairs(&global["global.v"]),
                &want[&name("value")],
                5e-5,
            );
        }
    }
}

#[test]
fn every_layer_the_memory_and_the_shared_kv_match_the_reference() {
    for kernels in [Kernels::Native, Kernels::Portable] {
        for case in CASES {
            let want = expected(case);
            let model = load(case, kernels);
            let tokens = want["tokens"]
                .to_dtype(DType::U32)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let (trace, cache) = model.phi4flash_trace(&tokens).unwrap();
            let layers = model.config().n_layers();
            assert_eq!(trace.hidden.len(), layers);
            for (i, h) in trace.hidden.iter().enumerate() {
                close(
                    &format!("{case} hidden.{i}"),
                    &h.squeeze(0).unwrap(),
                    &want[&format!("hidden.{i}")],
                    2e-4,
                );
            }
            let final_norm = trace.final_norm.unwrap().squeeze(0).unwrap();
            close(
                &format!("{case} final_norm"),
                &final_norm,
                &want["final_norm"],
                2e-4,
            );
            let memory = trace.memory.unwrap().squeeze(0).unwrap();
            close(&format!("{case} memory"), &memory, &want["memory"], 5e-5);
            let mut global = HashMap::new();
            cache.global.save(&mut global).unwrap();
            close(
                &format!("{case} shared.key"),
                &heads_of_pairs(&global["global.k"]),
                &want["shared.key"],
                5e-5,
            );
            close(
                &format!("{case} shared.value"),
                &heads_of_pairs(&global["global.v"]),
                &want["shared.value"],
                5e-5,
            );
        }
    }
}

#[test]
fn the_caches_after_the_prompt_and_after_decoding_match_the_reference() {
    for kernels in [Kernels::Native, Kernels::Portable] {
        for case in CASES {
            let want = expected(case);
            let model = load(case, kernels);
            let tokens: Vec<u32> = want["tokens"]
                .to_dtype(DType::U32)
                .unwrap()
                .to_vec1()
                .unwrap();
            let p = want["prompt_len"].to_vec1::<i64>().unwrap()[0] as usize;
            let greedy: Vec<u32> = want["greedy"]
                .to_dtype(DType::U32)
                .unwrap()
                .to_vec1()
                .unwrap();
            let mut cache = model.new_cache(1).unwrap();
            let prompt = Tensor::new(&tokens[..p], &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            model.prefill(&prompt, &mut cache).unwrap();
            compare_cache(case, &cache, &want, "cache");
            // The reference consumes P + 19 tokens: the greedy continuation but its last token.
            for &t in &greedy[..greedy.len() - 1] {
                model
                    .step(&Tensor::new(&[t], &Device::Cpu).unwrap(), &mut cache)
                    .unwrap();
            }
            compare_cache(case, &cache, &want, "cache_end");
        }
    }
}
