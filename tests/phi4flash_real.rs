//! The real Phi-4-mini-flash-reasoning, when a downloaded copy is at hand (this project's
//! machines have none): `YOCO_PHI4FLASH_DIR=/path/to/Phi-4-mini-flash-reasoning cargo test
//! --release --test phi4flash_real -- --ignored --nocapture`. Set `YOCO_PHI4FLASH_QUANT` to
//! `q8_0` or `q4_k` to load it quantized (about 4.2 GB with Q4_K instead of 15.4 GB in f32).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use yoco::{GenerationConfig, LoadOptions, Model, Phi4FlashConfig, Quant, Tokenizer};

fn real_dir() -> Option<PathBuf> {
    std::env::var_os("YOCO_PHI4FLASH_DIR").map(PathBuf::from)
}

/// Name -> (dtype, shape) from the headers of every safetensors file of `dir`.
fn headers(dir: &Path) -> BTreeMap<String, (String, Vec<usize>)> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("safetensors") {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
        for (name, info) in header.as_object().unwrap() {
            if name == "__metadata__" {
                continue;
            }
            let dtype = info["dtype"].as_str().unwrap().to_string();
            let shape = info["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as usize)
                .collect();
            out.insert(name.clone(), (dtype, shape));
        }
    }
    out
}

#[test]
#[ignore = "needs a downloaded Phi-4-mini-flash-reasoning in YOCO_PHI4FLASH_DIR"]
fn the_real_checkpoint_has_every_tensor_and_generates() {
    let Some(dir) = real_dir() else {
        eprintln!("YOCO_PHI4FLASH_DIR is not set: nothing to check");
        return;
    };
    let found = headers(&dir);
    let lm_head = found.contains_key("lm_head.weight");
    let cfg = Phi4FlashConfig::from_file(dir.join("config.json")).unwrap();
    assert_eq!(
        cfg,
        Phi4FlashConfig {
            stop_token_ids: vec![],
            max_positions: cfg.max_positions,
            ..Phi4FlashConfig::phi4_mini_flash()
        }
    );
    let params = cfg.parameters(lm_head);
    assert_eq!(params.len(), 434 + usize::from(lm_head));
    assert_eq!(found.len(), params.len());
    for p in &params {
        let (dtype, shape) = &found[&p.name];
        assert_eq!(shape, &p.shape, "{}", p.name);
        assert!(
            matches!(dtype.as_str(), "BF16" | "F32"),
            "{}: {dtype}",
            p.name
        );
    }
    let quant = std::env::var("YOCO_PHI4FLASH_QUANT")
        .ok()
        .map(|q| q.parse::<Quant>().unwrap());
    let options = LoadOptions {
        quant,
        ..LoadOptions::default()
    };
    let t0 = std::time::Instant::now();
    let model = Model::load_with(&dir, &options).unwrap();
    eprintln!(
        "loaded in {:.1} s, {:.2} GB of weights",
        t0.elapsed().as_secs_f64(),
        model.weight_bytes() as f64 / 1e9
    );
    let tokenizer = Tokenizer::from_model_dir(&dir).unwrap();
    let prompt = tokenizer
        .encode(
            "<|user|>What is 3*x^2+4*x+5=1 solved for x?<|end|><|assistant|>",
            false,
        )
        .unwrap();
    let cfg = GenerationConfig::greedy(20)
        .for_tokenizer(&tokenizer)
        .for_model(&model);
    let out = model.generate(&prompt, &cfg).unwrap();
    eprintln!(
        "{:?} ({:.1} tokens/s)",
        tokenizer.decode(&out.tokens, false).unwrap(),
        out.decode_tokens_per_s()
    );
    assert!(!out.tokens.is_empty());
}
