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

/// Differential attention as the reference writes it, with loops: even/odd heads, four
/// softmax-attention calls over the two halves of the values, lambda, the sub-layer RMSNorm.
/// `x: (T, dim)` already normalised; `window`: keys a query sees (itself included), or all.
fn naive_diff_attention(
    w: &HashMap<String, Tensor>,
    layer: usize,
    x: &[Vec<f32>],
    (h, kv, hd): (usize, usize, usize),
    window: Option<usize>,
) -> Vec<Vec<f32>> {
    let get = |n: &str| -> Vec<f32> {
        w[&format!("model.layers.{layer}.attn.{n}")]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let (wqkv, bqkv) = (get("Wqkv.weight"), get("Wqkv.bias"));
    let (wo, bo) = (get("out_proj.weight"), get("out_proj.bias"));
    let lam = |a: &str, b: &str| -> f64 {
        let (a, b) = (
            get(&format!("inner_cross_attn.lambda_{a}")),
            get(&format!("inner_cross_attn.lambda_{b}")),
        );
        f64::from(a.iter().zip(&b).map(|(x, y)| x * y).sum::<f32>().exp())
    };
    let init = 0.8 - 0.6 * (-0.3 * layer as f64).exp();
    let lambda = lam("q1", "k1") - lam("q2", "k2") + init;
    let subln = get("inner_cross_attn.subln.weight");
    let dim = x[0].len();
    let rows = (h + 2 * kv) * hd;
    // proj[t][r] = Wqkv x_t + b
    let proj: Vec<Vec<f64>> = x
        .iter()
        .map(|xt| {
            (0..rows)
                .map(|r| {
                    f64::from(bqkv[r])
                        + (0..dim)
                            .map(|c| f64::from(wqkv[r * dim + c]) * f64::from(xt[c]))
                            .sum::<f64>()
                })
                .collect()
        })
        .collect();
    let q = |t: usize, head: usize, i: usize| proj[t][head * hd + i];
    let k = |t: usize, head: usize, i: usize| proj[t][h * hd + head * hd + i];
    let v = |t: usize, head: usize, i: usize| proj[t][(h + kv) * hd + head * hd + i];
    let n = x.len();
    let g = h / kv;
    let mut out = vec![vec![0f32; dim]; n];
    for t in 0..n {
        let lo = window.map_or(0, |w| (t + 1).saturating_sub(w));
        let mut o = vec![0f64; h * hd];
        for j in 0..h / 2 {
            // One softmax per half: q1 = query head 2j over key head 2 (j / g), q2 = 2j + 1
            // over 2 (j / g) + 1; each applied to the two value heads 2 (j / g), 2 (j / g) + 1.
            let probs = |qh: usize, kh: usize| -> Vec<f64> {
                let s: Vec<f64> = (lo..=t)
                    .map(|u| {
                        (0..hd).map(|i| q(t, qh, i) * k(u, kh, i)).sum::<f64>() / (hd as f64).sqrt()
                    })
                    .collect();
                let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                e.into_iter().map(|x| x / z).collect()
            };
            let kvh = 2 * (j / g);
            let (p1, p2) = (probs(2 * j, kvh), probs(2 * j + 1, kvh + 1));
            let mut a = vec![0f64; 2 * hd];
            for (half, vh) in [kvh, kvh + 1].into_iter().enumerate() {
                for i in 0..hd {
                    let a1: f64 = (lo..=t).map(|u| p1[u - lo] * v(u, vh, i)).sum();
                    let a2: f64 = (lo..=t).map(|u| p2[u - lo] * v(u, vh, i)).sum();
                    a[half * hd + i] = a1 - lambda * a2;
                }
            }
            let rms = (a.iter().map(|x| x * x).sum::<f64>() / (2 * hd) as f64 + 1e-5).sqrt();
            for i in 0..2 * hd {
                o[j * 2 * hd + i] = a[i] / rms * f64::from(subln[i]) * (1.0 - init);
            }
        }
        for (r, out) in out[t].iter_mut().enumerate() {
            *out = (f64::from(bo[r])
                + (0..h * hd)
                    .map(|c| f64::from(wo[r * h * hd + c]) * o[c])
                    .sum::<f64>()) as f32;
        }
    }
    out
}

#[test]
fn differential_attention_equals_the_reference_formula_written_with_loops() {
    use crate::layers::constants::Constants;
    use crate::layers::window_kv::WindowState;
    use crate::layers::Weights;
    use crate::models::phi4flash::attention::DiffAttention;
    use crate::models::phi4flash::catalogue::{Catalogue, MixerSpec};
    use crate::models::phi4flash::config::Phi4FlashConfig;

    let case = dir("a_l8_w4");
    let cfg = Phi4FlashConfig::from_file(format!("{case}/config.json")).unwrap();
    let tensors =
        candle_core::safetensors::load(format!("{case}/model.safetensors"), &Device::Cpu).unwrap();
    let heads = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim(),
    );
    let cat = Catalogue::new(&cfg, crate::models::phi4flash::catalogue::HeadForm::Tied);
    // Random inputs of 11 positions (more than the window of 4).
    let mut seed = 7u64;
    let x: Vec<Vec<f32>> = (0..11)
        .map(|_| {
            (0..cfg.hidden_size)
                .map(|_| {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((seed >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
                })
                .collect()
        })
        .collect();
    let xt = Tensor::new(x.clone(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    for native in [true, false] {
        let vb = candle_nn::VarBuilder::from_tensors(tensors.clone(), DType::F32, &Device::Cpu);
        let w = Weights::new(vb, native);
        for (layer, window) in [(1, Some(cfg.sliding_window)), (5, None)] {
            let MixerSpec::Attention(spec) = &cat.layers[layer].mixer else {
                panic!("layer {layer} is an attention layer")
            };
            let attn = DiffAttention::load(&w, spec, layer, heads, true).unwrap();
            let (q, kv) = attn.project(&xt).unwrap();
            let (k, v) = kv.unwrap();
            let consts = Constants::default();
            let pairs = (1, heads.1 / 2, 2 * heads.2);
            let o = match window {
                Some(win) => {
                    let mut state =
                        WindowState::new(1, pairs, win, DType::F32, &Device::Cpu).unwrap();
                    let chunk = state.begin(11, &consts).unwrap();
                    let slot = state.slots(&chunk).next().unwrap();
                    slot.attend(&q, &k, &v, attn.scale(), native).unwrap()
                }
                None => {
                    let mut global = crate::layers::global_kv::GlobalKv::with_shape(
                        pairs,
                        DType::F32,
                        &Device::Cpu,
                    )
                    .unwrap();
                    global.append((k, v)).unwrap();
                    let view = global.view(11, 11, &consts).unwrap();
                    view.attend(&q, attn.scale(), native).unwrap()
                }
            };
            let got = attn.output(&o).unwrap().squeeze(0).unwrap();
            let want = Tensor::new(
                naive_diff_attention(&tensors, layer, &x, heads, window),
                &Device::Cpu,
            )
            .unwrap();
            let d = max_diff(&got, &want);
            assert!(d < 1e-4, "layer {layer} native {native}: {d}");
        }
    }
}
