//! Property tests: mutated configs and checkpoints never panic; they load or give a typed error.

mod common;

use candle_core::{DType, Device};
use common::fixture;
use yoco::Rng;
use yoco::{Config, Model, Phi4FlashConfig};

fn tmp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("yoco-robust-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Values a hostile params.json might carry.
fn wild_value(rng: &mut Rng) -> serde_json::Value {
    let picks: [serde_json::Value; 12] = [
        0.into(),
        1.into(),
        2.into(),
        3.into(),
        (-1).into(),
        7.into(),
        64.into(),
        (1u64 << 40).into(),
        u64::MAX.into(),
        1.5.into(),
        serde_json::Value::Null,
        "64".into(),
    ];
    picks[(rng.next_u64() % picks.len() as u64) as usize].clone()
}

/// `n` copies of `base`, each with one to three of `fields` set to a wild value or removed.
fn mutations(
    base: &serde_json::Value,
    fields: &[&str],
    seed: u64,
    n: usize,
) -> Vec<serde_json::Value> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| {
            let mut v = base.clone();
            for _ in 0..1 + rng.next_u64() % 3 {
                let field = fields[(rng.next_u64() % fields.len() as u64) as usize];
                if rng.next_u64().is_multiple_of(5) {
                    v.as_object_mut().unwrap().remove(field);
                } else {
                    v[field] = wild_value(&mut rng);
                }
            }
            v
        })
        .collect()
}

#[test]
fn mutated_params_json_gives_a_valid_config_or_a_typed_error() {
    let base: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("gret").join("params.json")).unwrap(),
    )
    .unwrap();
    let fields = [
        "dim",
        "n_layers",
        "hidden_dim",
        "n_self_heads",
        "n_attn_heads",
        "n_attn_kv_heads",
        "vocab_size",
        "rope_theta",
        "norm_eps",
        "sliding_window",
        "max_positions",
        "unknown_field",
    ];
    let mut accepted = 0;
    for v in mutations(&base, &fields, 11, 2000) {
        match Config::from_json(&v.to_string()) {
            Ok(cfg) => {
                // Whatever is accepted must be internally consistent.
                cfg.validate().unwrap();
                assert_eq!(cfg.n_layers % 2, 0);
                assert_eq!(cfg.dim % cfg.n_self_heads, 0);
                assert_eq!(cfg.n_attn_heads % cfg.n_attn_kv_heads, 0);
                assert!(cfg.sliding_window != Some(0));
                accepted += 1;
            }
            Err(yoco::Error::Json { .. } | yoco::Error::Config(_)) => {}
            Err(other) => panic!("unexpected error kind: {other}"),
        }
    }
    // The mutations must exercise both outcomes.
    assert!(accepted > 0 && accepted < 2000, "{accepted}");
}

#[test]
fn mutated_phi4flash_config_json_gives_a_valid_config_or_a_typed_error() {
    let base: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("phi4flash/b_l12_w8").join("config.json")).unwrap(),
    )
    .unwrap();
    let fields = [
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
        "layer_norm_eps",
        "sliding_window",
        "mamba_d_state",
        "mamba_d_conv",
        "mamba_expand",
        "mamba_dt_rank",
        "mb_per_layer",
        "max_position_embeddings",
        "model_type",
        "layer_types",
    ];
    let mut accepted = 0;
    for v in mutations(&base, &fields, 23, 2000) {
        match Phi4FlashConfig::from_json(&v.to_string()) {
            Ok(cfg) => {
                // Whatever is accepted must be internally consistent and countable.
                cfg.validate().unwrap();
                assert_eq!(cfg.num_hidden_layers % 4, 0);
                assert_eq!(cfg.hidden_size % cfg.num_attention_heads, 0);
                assert_eq!(cfg.num_key_value_heads % 2, 0);
                assert!(cfg.n_params() > 0);
                accepted += 1;
            }
            Err(yoco::Error::Json { .. } | yoco::Error::Config(_)) => {}
            Err(other) => panic!("unexpected error kind: {other}"),
        }
    }
    assert!(accepted > 0 && accepted < 2000, "{accepted}");
}

#[test]
fn mutated_safetensors_bytes_never_panic() {
    let src = fixture("gret");
    let original = std::fs::read(src.join("model.safetensors")).unwrap();
    let header_len = u64::from_le_bytes(original[..8].try_into().unwrap()) as usize;
    let dir = tmp_dir("bytes");
    std::fs::copy(src.join("params.json"), dir.join("params.json")).unwrap();
    let mut rng = Rng::new(5);
    let (mut ok, mut err) = (0, 0);
    for i in 0..150 {
        let mut bytes = original.clone();
        match i % 3 {
            // Flip bytes in the length prefix or the JSON header.
            0 | 1 => {
                for _ in 0..1 + rng.next_u64() % 4 {
                    let at = (rng.next_u64() as usize) % (8 + header_len);
                    bytes[at] = (rng.next_u64() & 0xff) as u8;
                }
            }
            // Truncate anywhere.
            _ => bytes.truncate((rng.next_u64() as usize) % original.len()),
        }
        std::fs::write(dir.join("model.safetensors"), &bytes).unwrap();
        match Model::load(&dir, &Device::Cpu, DType::F32) {
            Ok(_) => ok += 1,
            Err(
                yoco::Error::Checkpoint(_)
                | yoco::Error::MissingTensor { .. }
                | yoco::Error::ShapeMismatch { .. }
                | yoco::Error::UnexpectedTensors(_),
            ) => err += 1,
            Err(other) => panic!("mutation {i}: unexpected error kind: {other}"),
        }
    }
    assert!(err > 0, "{ok} loaded, {err} rejected");
    let _ = std::fs::remove_dir_all(&dir);
}
