//! The small model that ships with the crate: it loads, and it has learned English verse.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, D};
use yoco::{GenerationConfig, Model, Tokenizer};

/// From The Tempest, Act 1, Scene 1: one of the two plays held out of training.
const HELD_OUT: &str = "BOATSWAIN.
Heigh, my hearts! cheerly, cheerly, my hearts!
yare, yare! Take in the topsail. Tend to th' master's
whistle.--Blow till thou burst thy wind, if room enough.

[Enter ALONSO, SEBASTIAN, ANTONIO, FERDINAND, GONZALO, and
OTHERS]

ALONSO.
Good boatswain, have care. Where's the master?
Play the men.

BOATSWAIN.
I pray now, keep below.

ANTONIO.
Where is the master, boson?

BOATSWAIN.
Do you not hear him? You mar our labour:
keep your cabins: you do assist the storm.

GONZALO.
Nay, good, be patient.
";

fn model_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/shakespeare")
}

fn bits_per_byte(model: &Model, tokenizer: &Tokenizer, text: &str) -> f64 {
    let ids = tokenizer.encode(text, true).unwrap();
    let mut cache = model.new_cache(1).unwrap();
    let input = Tensor::new(&ids[..], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits = model
        .forward(&input, &mut cache)
        .unwrap()
        .squeeze(0)
        .unwrap();
    let logp: Vec<Vec<f32>> = candle_nn::ops::log_softmax(&logits, D::Minus1)
        .unwrap()
        .to_vec2()
        .unwrap();
    let nats: f64 = (1..ids.len())
        .map(|t| -(logp[t - 1][ids[t] as usize] as f64))
        .sum();
    nats / std::f64::consts::LN_2 / text.len() as f64
}

#[test]
fn held_out_verse_scores_far_below_what_random_weights_can_reach() {
    let model = Model::load(model_dir(), &Device::Cpu, DType::F32).unwrap();
    let tokenizer = Tokenizer::from_model_dir(model_dir()).unwrap();
    let bpb = bits_per_byte(&model, &tokenizer, HELD_OUT);
    // A model that knows nothing spreads its probability over the vocabulary: about
    // log2(vocab) bits per token, i.e. more than 4 bits per byte here. A loader that scrambled
    // any weight (a transposed projection, a wrong RoPE, a swapped FFN branch) lands near that.
    let ids = tokenizer.encode(HELD_OUT, false).unwrap();
    let uniform =
        (model.config().vocab_size() as f64).log2() * ids.len() as f64 / HELD_OUT.len() as f64;
    assert!(uniform > 4.0, "{uniform}");
    assert!(
        bpb < 3.0,
        "held-out bits per byte {bpb:.3} (uniform would be {uniform:.2})"
    );
}

#[test]
fn greedy_text_is_laid_out_like_a_play() {
    let model = Model::load(model_dir(), &Device::Cpu, DType::F32).unwrap();
    let tokenizer = Tokenizer::from_model_dir(model_dir()).unwrap();
    let cfg = GenerationConfig::greedy(80).for_tokenizer(&tokenizer);
    let (text, out) = model
        .generate_text(&tokenizer, "HAMLET.\n", &cfg, |_| {
            std::ops::ControlFlow::Continue(())
        })
        .unwrap();
    assert!(!out.tokens.is_empty());
    // Several lines, and mostly letters and spaces: verse, not noise.
    assert!(text.lines().count() >= 3, "{text:?}");
    let letters = text
        .chars()
        .filter(|c| c.is_alphabetic() || c.is_whitespace())
        .count();
    assert!(
        letters as f64 >= 0.85 * text.chars().count() as f64,
        "{text:?}"
    );
}

/// The llama2.c habit: a golden greedy continuation of the shipped model, made by an independent
/// implementation (`tools/make_golden.py`, PyTorch), that any numeric drift in loading, the
/// layers, the cache or the decode loop would break, byte for byte.
#[test]
fn greedy_text_equals_the_golden_continuation_byte_for_byte() {
    let model = Model::load(model_dir(), &Device::Cpu, DType::F32).unwrap();
    let tokenizer = Tokenizer::from_model_dir(model_dir()).unwrap();
    let golden: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/shipped/greedy.json"),
        )
        .unwrap(),
    )
    .unwrap();
    for case in golden["cases"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let n = case["max_new_tokens"].as_u64().unwrap() as usize;
        let cfg = GenerationConfig::greedy(n).for_tokenizer(&tokenizer);
        let (text, out) = model
            .generate_text(&tokenizer, prompt, &cfg, |_| {
                std::ops::ControlFlow::Continue(())
            })
            .unwrap();
        let want: Vec<u32> = case["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(out.tokens, want, "{prompt:?}");
        assert_eq!(text, case["text"].as_str().unwrap(), "{prompt:?}");
    }
}
