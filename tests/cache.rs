//! Saved sessions, forks and shared models.

mod common;

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use common::{expected, fixture, ids, max_abs_diff};
use yoco::{Cache, GenerationConfig, Model, Sampling};

fn load(folder: &str) -> Model {
    Model::load(fixture(folder), &Device::Cpu, DType::F32).unwrap()
}

fn tmp(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("yoco-cache-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn sampled(n: usize, seed: u64) -> GenerationConfig {
    GenerationConfig {
        sampling: Sampling {
            temperature: 1.0,
            ..Sampling::default()
        },
        seed,
        stop_tokens: vec![],
        suppress_tokens: vec![],
        ..GenerationConfig::greedy(n)
    }
}

#[test]
fn resuming_from_a_saved_cache_gives_the_same_tokens_as_never_stopping() {
    for folder in ["gret", "swa"] {
        let model = load(folder);
        let toks = expected(folder).tokens;
        let (system, user) = (&toks[..70], &toks[70..90]);
        // Never stopping: system prompt and user turn in one go.
        let whole: Vec<u32> = toks[..90].to_vec();
        let straight = model
            .generate(&whole, &GenerationConfig::greedy(25))
            .unwrap();

        // Prefill the system prompt, save, restore, continue with the user turn.
        let mut cache = model.new_cache(1).unwrap();
        model.prefill(&ids(system), &mut cache).unwrap();
        let path = tmp(&format!("{folder}.safetensors"));
        cache.save(&path).unwrap();
        drop(cache);
        let mut restored = model.load_cache(&path).unwrap();
        assert_eq!(restored.positions(), &[70]);
        let resumed = model
            .generate_from(&mut restored, user, &GenerationConfig::greedy(25), |_| {
                std::ops::ControlFlow::Continue(())
            })
            .unwrap();
        assert_eq!(resumed.tokens, straight.tokens, "{folder}");
    }
}

#[test]
fn a_forked_cache_is_independent_of_its_parent() {
    let model = load("swa");
    let toks = expected("swa").tokens;
    let mut parent = model.new_cache(1).unwrap();
    model.prefill(&ids(&toks[..50]), &mut parent).unwrap();
    let mut child = parent.clone();
    // Advance the child a lot (past the window, growing the global K/V), then check the parent
    // still gives the reference logits for position 50.
    for &t in &toks[50..120] {
        model
            .step(&Tensor::new(&[t], &Device::Cpu).unwrap(), &mut child)
            .unwrap();
    }
    let logits = model
        .step(
            &Tensor::new(&[toks[50]], &Device::Cpu).unwrap(),
            &mut parent,
        )
        .unwrap();
    let diff = max_abs_diff(&logits, &expected("swa").logits.narrow(0, 50, 1).unwrap());
    assert!(diff < 1e-4, "{diff}");
    assert_eq!(child.positions(), &[120]);
    assert_eq!(parent.positions(), &[51]);
}

#[test]
fn a_system_prompt_prefilled_once_serves_many_requests() {
    let model = load("gret");
    let toks = expected("gret").tokens;
    let mut system = model.new_cache(1).unwrap();
    model.prefill(&ids(&toks[..60]), &mut system).unwrap();
    for (i, user) in [&toks[60..64], &toks[100..110], &toks[200..201]]
        .iter()
        .enumerate()
    {
        let mut fork = system.clone();
        let from_fork = model
            .generate_from(&mut fork, user, &sampled(12, i as u64), |_| {
                std::ops::ControlFlow::Continue(())
            })
            .unwrap();
        let mut full = toks[..60].to_vec();
        full.extend_from_slice(user);
        let alone = model.generate(&full, &sampled(12, i as u64)).unwrap();
        assert_eq!(from_fork.tokens, alone.tokens);
    }
    assert_eq!(system.positions(), &[60]);
}

#[test]
fn reset_returns_the_cache_to_an_empty_sequence() {
    let model = load("swa");
    let toks = expected("swa").tokens;
    let mut cache = model.new_cache(1).unwrap();
    model.prefill(&ids(&toks[..100]), &mut cache).unwrap();
    cache.reset().unwrap();
    assert_eq!(cache.positions(), &[0]);
    assert_eq!(cache.global_kv_bytes(), 0);
    let logits = model
        .forward(&ids(&toks[..40]), &mut cache)
        .unwrap()
        .squeeze(0)
        .unwrap();
    assert!(max_abs_diff(&logits, &expected("swa").logits.narrow(0, 0, 40).unwrap()) < 1e-4);
}

#[test]
fn one_model_shared_by_threads_gives_the_sequential_results() {
    let model = Arc::new(load("gret"));
    let toks = expected("gret").tokens;
    let prompts: Vec<Vec<u32>> = (0..6)
        .map(|i| toks[i * 20..i * 20 + 10 + i].to_vec())
        .collect();
    let sequential: Vec<Vec<u32>> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| model.generate(p, &sampled(20, i as u64)).unwrap().tokens)
        .collect();
    let handles: Vec<_> = prompts
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            let model = Arc::clone(&model);
            std::thread::spawn(move || model.generate(&p, &sampled(20, i as u64)).unwrap().tokens)
        })
        .collect();
    let parallel: Vec<Vec<u32>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(parallel, sequential);
}

#[test]
fn the_self_decoder_state_stays_constant_while_the_global_kv_grows_per_token() {
    for folder in ["gret", "swa"] {
        let model = load(folder);
        let cfg = model.config().as_yoco().unwrap().clone();
        let mut cache = model.new_cache(1).unwrap();
        let mut sizes = Vec::new();
        for (i, &t) in expected(folder).tokens.iter().enumerate().take(120) {
            model
                .step(&Tensor::new(&[t], &Device::Cpu).unwrap(), &mut cache)
                .unwrap();
            sizes.push((i + 1, cache.self_state_bytes(), cache.global_kv_bytes()));
        }
        let per_token = cfg.cache_bytes_per_token(4);
        for &(n, state, global) in &sizes {
            assert_eq!(global, n * per_token, "{folder}: global K/V at {n}");
            if n >= 40 {
                // gRet: always the same; SWA: W - 1 = 31 entries once the window is full.
                assert_eq!(state, sizes[39].1, "{folder}: self state at {n}");
            }
        }
        assert!(sizes[119].1 <= cfg.self_state_bytes(4));
    }
}

/// Continuous batching: a row joins a batch that is already decoding (a stack of a multi-row
/// cache and a one-row cache), and every row goes on exactly as it would alone.
#[test]
fn a_row_joins_a_running_batch_and_every_row_steps_as_alone() {
    for folder in ["gret", "swa"] {
        let model = load(folder);
        let toks = expected(folder).tokens;
        let prompts = [&toks[..7], &toks[10..60], &toks[70..110]];
        let mut alone: Vec<Cache> = prompts
            .iter()
            .map(|p| {
                let mut c = model.new_cache(1).unwrap();
                model.prefill(&ids(p), &mut c).unwrap();
                c
            })
            .collect();
        // Rows 0 and 1 decode together for 5 steps, then row 2 joins.
        let mut batch = Cache::stack(&alone[..2]).unwrap();
        let feed = |i: usize, step: usize| toks[(150 + 3 * step + i) % toks.len()];
        for step in 0..5 {
            let next: Vec<u32> = (0..2).map(|i| feed(i, step)).collect();
            model
                .step(
                    &Tensor::new(next.as_slice(), &Device::Cpu).unwrap(),
                    &mut batch,
                )
                .unwrap();
            for (i, cache) in alone.iter_mut().enumerate().take(2) {
                model
                    .step(&Tensor::new(&[feed(i, step)], &Device::Cpu).unwrap(), cache)
                    .unwrap();
            }
        }
        let mut batch = Cache::stack(&[batch, alone[2].clone()]).unwrap();
        assert_eq!(batch.positions(), &[12, 55, 40]);
        for step in 5..40 {
            let next: Vec<u32> = (0..3).map(|i| feed(i, step)).collect();
            let together = model
                .step(
                    &Tensor::new(next.as_slice(), &Device::Cpu).unwrap(),
                    &mut batch,
                )
                .unwrap();
            for (i, cache) in alone.iter_mut().enumerate() {
                let single = model
                    .step(&Tensor::new(&[feed(i, step)], &Device::Cpu).unwrap(), cache)
                    .unwrap();
                let diff = max_abs_diff(&together.narrow(0, i, 1).unwrap(), &single);
                assert!(diff < 1e-5, "{folder} row {i} step {step}: {diff}");
            }
        }
        let back = batch.split().unwrap();
        for (b, a) in back.iter().zip(&alone) {
            assert_eq!(b.positions(), a.positions());
        }
    }
}
