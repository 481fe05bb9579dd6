//! Quantized weights: what each projection gets, how far the logits move from float32's (bounds
//! measured per format on the official fixtures and on the shipped model), that a quantized
//! model computes exactly what float32 computes with the dequantized weights, that Q8_0 keeps the
//! shipped model's greedy text, and that a `model.gguf` loads back bit for bit.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::quantized::{gguf_file, GgmlDType};
use candle_core::{DType, Device, Tensor};
use common::{ids, max_abs_diff};
use yoco::{Config, Kernels, LoadOptions, Model, Part, Quant, Tokenizer, WeightFormat};

/// The opening of Twelfth Night, one of the two plays held out of the shipped model's training.
const HELD_OUT: &str = "DUKE.
If music be the food of love, play on,
Give me excess of it; that, surfeiting,
The appetite may sicken and so die.
That strain again, it had a dying fall:
O, it came o'er my ear like the sweet sound
That breathes upon a bank of violets,
Stealing and giving odour. Enough; no more;
'Tis not so sweet now as it was before.
O spirit of love, how quick and fresh art thou,
That notwithstanding thy capacity
Receiveth as the sea, nought enters there,
Of what validity and pitch soever,
But falls into abatement and low price
Even in a minute!
";

/// A directory under the system temp dir, unique per test and process, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let path =
            std::env::temp_dir().join(format!("yoco-quant-{}-{n}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn official(name: &str) -> PathBuf {
    root().join("tests/fixtures/official").join(name)
}

fn shipped() -> PathBuf {
    root().join("models/shakespeare")
}

fn load(dir: &Path, quant: Option<Quant>, kernels: Kernels) -> Model {
    let options = LoadOptions {
        quant,
        kernels,
        ..LoadOptions::default()
    };
    Model::load_with(dir, &options)
        .unwrap_or_else(|e| panic!("{} ({quant:?}) must load: {e}", dir.display()))
}

/// The tokens each drift case scores: the official fixtures' own tokens (which the official
/// code's logits are for), and the held-out passage for the shipped model.
fn case_tokens(dir: &Path) -> Vec<u32> {
    if dir == shipped() {
        return Tokenizer::from_model_dir(dir)
            .unwrap()
            .encode(HELD_OUT, true)
            .unwrap();
    }
    // The checkpoint.pth and sharded fixtures hold gret's weights and share its tokens.
    let own = dir.join("expected.safetensors");
    let path = if own.is_file() {
        own
    } else {
        common::fixture("gret").join("expected.safetensors")
    };
    let exp = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
    exp["tokens"]
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|x| x as u32)
        .collect()
}

/// Logits of every position: the full forward (prefill path), and the same positions reached
/// by a forward over all but the last 32 tokens and then one step per token (decode path).
fn both_paths(model: &Model, tokens: &[u32]) -> (Tensor, Tensor) {
    let mut cache = model.new_cache(1).unwrap();
    let full = model
        .forward(&ids(tokens), &mut cache)
        .unwrap()
        .squeeze(0)
        .unwrap();
    let half = tokens.len().saturating_sub(32).max(1);
    let mut cache = model.new_cache(1).unwrap();
    let mut rows = vec![model
        .forward(&ids(&tokens[..half]), &mut cache)
        .unwrap()
        .squeeze(0)
        .unwrap()];
    for &t in &tokens[half..] {
        let step = model
            .step(&Tensor::new(&[t], &Device::Cpu).unwrap(), &mut cache)
            .unwrap();
        rows.push(step);
    }
    (full, Tensor::cat(&rows, 0).unwrap())
}

/// Largest |logit difference| from float32 for each format, the largest measured (full forward
/// and decode path, native and portable kernels) with about 50% margin. Measured on the official
/// fixtures gret_gqa / swa_w24 (logits within +-2.5) and on the shipped model over the held-out
/// passage (logits within +-19):
///   Q8_0: 0.021 / 0.019 / 0.354
///   Q4_0: 0.199 / 0.195 / 2.33
///   Q4_K: 0.091 / 0.088 / 1.21   (with Q5_0 for the widths that are not multiples of 256)
fn drift_bound(dir: &Path, quant: Quant) -> f32 {
    let on_shipped = dir == shipped();
    match (quant, on_shipped) {
        (Quant::Q8_0, false) => 0.035,
        (Quant::Q8_0, true) => 0.55,
        (Quant::Q4_0, false) => 0.3,
        (Quant::Q4_0, true) => 3.5,
        (Quant::Q4K, false) => 0.15,
        (Quant::Q4K, true) => 1.8,
        _ => 0.0,
    }
}

/// Mean next-token NLL (nats) of `tokens` from full-forward logits.
fn mean_nll(logits: &Tensor, tokens: &[u32]) -> f64 {
    let logp: Vec<Vec<f32>> = candle_nn::ops::log_softmax(logits, candle_core::D::Minus1)
        .unwrap()
        .to_vec2()
        .unwrap();
    let total: f64 = (1..tokens.len())
        .map(|t| -f64::from(logp[t - 1][tokens[t] as usize]))
        .sum();
    total / (tokens.len() - 1) as f64
}

#[test]
fn logits_stay_within_the_bound_measured_for_each_format() {
    for dir in [official("gret_gqa"), official("swa_w24"), shipped()] {
        let tokens = case_tokens(&dir);
        // float32 itself is checked against the official code's logits by tests/official.rs.
        let (full, _) = both_paths(&load(&dir, None, Kernels::Native), &tokens);
        let nll = mean_nll(&full, &tokens);
        for quant in Quant::ALL {
            for kernels in [Kernels::Native, Kernels::Portable] {
                let model = load(&dir, Some(quant), kernels);
                let (q_full, q_steps) = both_paths(&model, &tokens);
                let (a, b) = (max_abs_diff(&full, &q_full), max_abs_diff(&full, &q_steps));
                let bound = drift_bound(&dir, quant);
                let dnll = mean_nll(&q_full, &tokens) - nll;
                println!(
                    "{} {quant} {kernels:?}: max |logit - f32| full {a:.4}, steps {b:.4} \
                     (bound {bound}); mean NLL {nll:.4} {dnll:+.4} nats",
                    dir.file_name().unwrap().to_string_lossy()
                );
                assert!(
                    a <= bound && b <= bound,
                    "{} {quant} {kernels:?}",
                    dir.display()
                );
                if dir == shipped() {
                    // The trained model's likelihood of held-out text barely moves (measured:
                    // +0.0011 / +0.0102 / +0.0046 nats per token at most).
                    let most = if quant == Quant::Q8_0 { 0.004 } else { 0.03 };
                    assert!(dnll.abs() <= most, "{quant} {kernels:?}: NLL moved {dnll}");
                }
                // Quantization moves the logits: a format that changed nothing would be a bug.
                assert!(a > 0.0, "{quant} left the logits untouched");
            }
        }
    }
}

/// A float32 checkpoint of a quantized model's weights, dequantized from its `model.gguf` by
/// candle's own GGUF reader (an independent parse of the file yoco writes).
fn dequantized_checkpoint(gguf: &Path, cfg: &Config, into: &Path) {
    let mut file = std::fs::File::open(gguf).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let mut tensors = HashMap::new();
    for name in content.tensor_infos.keys() {
        let q = content.tensor(&mut file, name, &Device::Cpu).unwrap();
        tensors.insert(name.clone(), q.dequantize(&Device::Cpu).unwrap());
    }
    candle_core::safetensors::save(&tensors, into.join("model.safetensors")).unwrap();
    std::fs::write(into.join("params.json"), cfg.to_json().unwrap()).unwrap();
}

#[test]
fn a_quantized_model_computes_what_float32_computes_with_the_dequantized_weights() {
    for (dir, quant) in [
        (official("gret_gqa"), Quant::Q8_0),
        (official("swa_w24"), Quant::Q4K),
        (shipped(), Quant::Q4_0),
    ] {
        let tmp = TempDir::new("dequantized");
        let gguf = tmp.path().join("q.gguf");
        yoco::write_gguf(&dir, &gguf, Some(quant)).unwrap();
        let reference = TempDir::new("reference");
        let model = load(&dir, Some(quant), Kernels::Native);
        dequantized_checkpoint(&gguf, model.config().as_yoco().unwrap(), reference.path());
        let float = load(reference.path(), None, Kernels::Native);
        let tokens = case_tokens(&dir);
        let (full, steps) = both_paths(&model, &tokens);
        let (want_full, want_steps) = both_paths(&float, &tokens);
        // Prompts multiply by the dequantized weights in float32 (the same products), except on
        // a CPU with byte dot products: there Q8_0, Q4_0 and Q4_K prompt rows take the decode
        // kernel, input quantized to 8 bits, so the steps' bound below (measured: Q4_0 0.20 on
        // the shipped model, Q4_K 0.0067 on `swa_w24`).
        let d = max_abs_diff(&full, &want_full);
        let most = drift_bound(&dir, Quant::Q8_0);
        assert!(
            d <= most,
            "{} {quant}: full forward differs by {d}",
            dir.display()
        );
        // Decode steps dot the quantized weights with the input quantized to 8 bits per block
        // (as candle's and llama.cpp's kernels do), a much smaller change than the weights'.
        let d = max_abs_diff(&steps, &want_steps);
        assert!(
            d <= drift_bound(&dir, Quant::Q8_0),
            "{} {quant}: steps differ by {d}",
            dir.display()
        );
    }
}

/// The greedy continuation of `prompt` by `model`, step by step: each token with the gap between
/// the model's best logit and its second best at that step.
fn greedy_with_margins(model: &Model, prompt: &[u32], steps: usize) -> Vec<(u32, f32)> {
    let mut cache = model.new_cache(1).unwrap();
    let ids = Tensor::new(prompt, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let mut logits: Vec<f32> = model
        .prefill(&ids, &mut cache)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let mut out = Vec::with_capacity(steps);
    for _ in 0..steps {
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        let token = order[0] as u32;
        out.push((token, logits[order[0]] - logits[order[1]]));
        let next = Tensor::new(&[[token]], &Device::Cpu).unwrap();
        logits = model
            .step(&next, &mut cache)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
    }
    out
}

/// Q8_0 continues the shipped model's text as float32 does wherever float32's choice is clear:
/// fed float32's tokens, it picks float32's token at every step where float32's best logit leads
/// its second by more than 0.25 (quantizing weights and inputs moves this model's logits by up
/// to ~0.35 over a passage, so a closer race is the quantization's to decide either way), and
/// such steps are most of them.
#[test]
fn q8_0_keeps_the_shipped_models_greedy_text() {
    let dir = shipped();
    let tokenizer = Tokenizer::from_model_dir(&dir).unwrap();
    let f32_model = load(&dir, None, Kernels::Native);
    let q8 = load(&dir, Some(Quant::Q8_0), Kernels::Native);
    for prompt in ["ROMEO.\n", "HAMLET.\nTo be, or not to be", "BOATSWAIN.\n"] {
        let prompt = tokenizer.encode(prompt, true).unwrap();
        let want = greedy_with_margins(&f32_model, &prompt, 50);
        let mut cache = q8.new_cache(1).unwrap();
        let ids = Tensor::new(prompt.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let mut logits = q8.prefill(&ids, &mut cache).unwrap();
        let mut clear = 0;
        for (step, &(token, margin)) in want.iter().enumerate() {
            let v: Vec<f32> = logits.flatten_all().unwrap().to_vec1().unwrap();
            let best = (0..v.len()).max_by(|&a, &b| v[a].total_cmp(&v[b])).unwrap() as u32;
            if margin > 0.25 {
                clear += 1;
                assert_eq!(
                    best, token,
                    "step {step}: Q8_0 picks {best}, float32 {token} by {margin}"
                );
            }
            let next = Tensor::new(&[[token]], &Device::Cpu).unwrap();
            logits = q8.step(&next, &mut cache).unwrap();
        }
        assert!(clear >= 30, "only {clear} of 50 steps had a clear choice");
    }
}

#[test]
fn a_gguf_file_loads_back_bit_for_bit() {
    for (dir, quant) in [
        (official("gret_gqa"), Some(Quant::Q8_0)),
        (official("swa_w24"), Some(Quant::Q4K)),
        (official("swa_w24"), None),
        (shipped(), Some(Quant::Q4_0)),
        // Any loadable checkpoint: a torch checkpoint.pth under the trainer's prefix, shards.
        (common::fixture("gret_pth"), Some(Quant::Q8_0)),
        (common::fixture("gret_sharded"), Some(Quant::Q4K)),
    ] {
        let tmp = TempDir::new("roundtrip");
        let written = yoco::write_gguf(&dir, tmp.path().join("model.gguf"), quant).unwrap();
        let at_load = load(&dir, quant, Kernels::Native);
        let from_file = load(tmp.path(), None, Kernels::Native);
        assert_eq!(from_file.config(), at_load.config());
        assert_eq!(from_file.weights(), at_load.weights());
        assert_eq!(written, at_load.weights());
        let tokens = case_tokens(&dir);
        let (a_full, a_steps) = both_paths(&at_load, &tokens);
        let (b_full, b_steps) = both_paths(&from_file, &tokens);
        assert_eq!(max_abs_diff(&a_full, &b_full), 0.0, "{quant:?}");
        assert_eq!(max_abs_diff(&a_steps, &b_steps), 0.0, "{quant:?}");
        // A quantized file asked to quantize again keeps what it stores.
        let again = load(tmp.path(), Some(Quant::Q4_0), Kernels::Native);
        if quant.is_some() {
            assert_eq!(again.weights(), at_load.weights());
        }
    }
}

/// The format each projection gets, by its input width, written out by hand for the fixtures'
/// shapes: Q8_0 and Q4_0 need a multiple of 32, Q4_K a multiple of 256 (else Q5_0).
#[test]
fn each_projection_gets_the_format_its_width_allows() {
    // swa_w24: dim 128, FFN 256. gret_gqa: dim 128, FFN 320.
    let cases: [(PathBuf, Quant, GgmlDType, GgmlDType); 4] = [
        (
            official("swa_w24"),
            Quant::Q4K,
            GgmlDType::Q5_0,
            GgmlDType::Q4K,
        ),
        (
            official("gret_gqa"),
            Quant::Q4K,
            GgmlDType::Q5_0,
            GgmlDType::Q5_0,
        ),
        (
            official("gret_gqa"),
            Quant::Q8_0,
            GgmlDType::Q8_0,
            GgmlDType::Q8_0,
        ),
        (shipped(), Quant::Q4K, GgmlDType::Q5_0, GgmlDType::Q4K),
    ];
    for (dir, quant, reads_dim, reads_ffn) in cases {
        let model = load(&dir, Some(quant), Kernels::Native);
        for w in model.weights() {
            let want = if w.shape.len() == 1 || w.part == Part::Embedding {
                WeightFormat::Float(DType::F32)
            } else if w.name.ends_with("ffn.fc2.weight") {
                WeightFormat::Quantized(reads_ffn)
            } else {
                WeightFormat::Quantized(reads_dim)
            };
            assert_eq!(w.format, want, "{} {quant}: {}", dir.display(), w.name);
        }
        assert_eq!(
            model.weights().len(),
            model.config().as_yoco().unwrap().parameters().len()
        );
    }
    // A width that fits no block stays float; the FFN's 96 = 3 x 32 still quantizes.
    let cfg = Config::new(48, 2, 96, 2, 2, 1, 64);
    let options = LoadOptions {
        quant: Some(Quant::Q8_0),
        ..LoadOptions::default()
    };
    let model = Model::random_with(&cfg, &options).unwrap();
    for w in model.weights() {
        let quantized = w.name.ends_with("fc2.weight");
        assert_eq!(w.format.is_quantized(), quantized, "{}", w.name);
    }
    let mut cache = model.new_cache(1).unwrap();
    let logits = model.forward(&ids(&[1, 2, 3]), &mut cache).unwrap();
    assert_eq!(logits.dims(), &[1, 3, 64]);
}

#[test]
fn quantized_projections_take_the_bytes_of_their_blocks() {
    // Every projection of this shape fits every format (widths multiples of 256).
    let cfg = Config::new(256, 2, 512, 2, 4, 2, 300);
    let float = Model::random_with(&cfg, &LoadOptions::default()).unwrap();
    for quant in Quant::ALL {
        let options = LoadOptions {
            quant: Some(quant),
            ..LoadOptions::default()
        };
        let model = Model::random_with(&cfg, &options).unwrap();
        // Bytes per block over weights per block, from the GGML formats' definitions:
        // Q8_0 = f16 scale + 32 i8; Q4_0 = f16 scale + 32 nibbles; Q4_K = 2 f16 + 12 bytes of
        // scales + 256 nibbles.
        let (block_bytes, block) = match quant {
            Quant::Q8_0 => (2 + 32, 32),
            Quant::Q4_0 => (2 + 16, 32),
            _ => (4 + 12 + 128, 256),
        };
        let mut projections = (0, 0);
        for (q, f) in model.weights().iter().zip(float.weights()) {
            assert_eq!((&q.name, &q.shape), (&f.name, &f.shape));
            let n: usize = q.shape.iter().product();
            if q.format.is_quantized() {
                assert_eq!(q.bytes, n / block * block_bytes, "{}", q.name);
                projections.0 += q.bytes;
                projections.1 += f.bytes;
            } else {
                assert_eq!(q.bytes, f.bytes, "{}", q.name);
            }
        }
        let ratio = projections.0 as f64 / projections.1 as f64;
        assert!((ratio - block_bytes as f64 / (4.0 * block as f64)).abs() < 1e-9);
        assert_eq!(
            model.weight_bytes(),
            model.weights().iter().map(|w| w.bytes).sum::<usize>()
        );
    }
}
