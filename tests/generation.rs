//! Generation against the cache-free full forward, sampling settings, stops and batches.

mod common;

use std::ops::ControlFlow;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use common::{expected, fixture, ids};
use yoco::{Config, Error, GenerationConfig, Model, Sampling, StopReason};

fn load(folder: &str) -> Model {
    Model::load(fixture(folder), &Device::Cpu, DType::F32).unwrap()
}

/// Greedy with nothing suppressed and no stop token: plain argmax decoding.
fn plain_greedy(n: usize, chunk: usize) -> GenerationConfig {
    GenerationConfig {
        stop_tokens: vec![],
        suppress_tokens: vec![],
        prefill_chunk: chunk,
        ..GenerationConfig::greedy(n)
    }
}

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best as u32
}

#[test]
fn greedy_generate_equals_argmax_of_full_forward_from_scratch() {
    for folder in ["gret", "swa"] {
        let model = load(folder);
        let prompt = expected(folder).tokens[..100].to_vec();
        let out = model.generate(&prompt, &plain_greedy(40, 48)).unwrap();
        assert_eq!(out.tokens.len(), 40);
        assert_eq!(out.stop_reason, StopReason::MaxTokens);
        // Recompute every token from scratch, no cache reuse: a new cache and a full forward
        // over the whole growing sequence each time.
        let mut seq = prompt.clone();
        for (i, &tok) in out.tokens.iter().enumerate() {
            let mut cache = model.new_cache(1).unwrap();
            let logits = model.forward(&ids(&seq), &mut cache).unwrap();
            let last = logits
                .squeeze(0)
                .unwrap()
                .get(seq.len() - 1)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert_eq!(tok, argmax(&last), "{folder}: token {i} differs");
            seq.push(tok);
        }
    }
}

#[test]
fn top_k_one_and_tiny_top_p_equal_greedy() {
    let model = load("gret");
    let prompt = expected("gret").tokens[..30].to_vec();
    let greedy = model
        .generate(&prompt, &plain_greedy(32, 512))
        .unwrap()
        .tokens;
    for sampling in [
        Sampling {
            temperature: 1.5,
            top_k: Some(1),
            top_p: None,
            ..Sampling::default()
        },
        Sampling {
            temperature: 1.5,
            top_k: None,
            top_p: Some(1e-6),
            ..Sampling::default()
        },
    ] {
        let cfg = GenerationConfig {
            sampling,
            seed: 7,
            ..plain_greedy(32, 512)
        };
        assert_eq!(model.generate(&prompt, &cfg).unwrap().tokens, greedy);
    }
}

#[test]
fn a_seed_reproduces_and_different_seeds_differ() {
    let model = load("swa");
    let prompt = expected("swa").tokens[..20].to_vec();
    let cfg = |seed| GenerationConfig {
        sampling: Sampling {
            temperature: 1.0,
            top_p: None,
            ..Sampling::default()
        },
        seed,
        ..plain_greedy(40, 512)
    };
    let a = model.generate(&prompt, &cfg(1)).unwrap().tokens;
    let b = model.generate(&prompt, &cfg(1)).unwrap().tokens;
    let c = model.generate(&prompt, &cfg(2)).unwrap().tokens;
    assert_eq!(a, b);
    assert_ne!(a, c);
}

#[test]
fn stop_tokens_max_new_tokens_and_callback_stop() {
    let model = load("gret");
    let prompt = expected("gret").tokens[..16].to_vec();
    let full = model
        .generate(&prompt, &plain_greedy(24, 512))
        .unwrap()
        .tokens;
    // Stop at the first occurrence of the 6th token: everything before it, and not the stop token.
    let stop = full[5];
    let first = full.iter().position(|&t| t == stop).unwrap();
    let cfg = GenerationConfig {
        stop_tokens: vec![stop],
        ..plain_greedy(24, 512)
    };
    let out = model.generate(&prompt, &cfg).unwrap();
    assert_eq!(out.stop_reason, StopReason::StopToken(stop));
    assert_eq!(out.tokens, full[..first]);

    let out = model.generate(&prompt, &plain_greedy(7, 512)).unwrap();
    assert_eq!(out.tokens, full[..7]);
    assert_eq!(out.stop_reason, StopReason::MaxTokens);

    let mut seen = Vec::new();
    let out = model
        .generate_stream(&prompt, &plain_greedy(24, 512), |t| {
            seen.push(t);
            if seen.len() == 3 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .unwrap();
    assert_eq!(out.stop_reason, StopReason::Callback);
    assert_eq!(out.tokens, full[..3]);
    assert_eq!(seen, full[..3]);
}

#[test]
fn suppressed_tokens_are_never_generated() {
    let model = load("gret");
    let prompt = expected("gret").tokens[..16].to_vec();
    let full = model
        .generate(&prompt, &plain_greedy(24, 512))
        .unwrap()
        .tokens;
    let cfg = GenerationConfig {
        suppress_tokens: vec![full[0], full[1]],
        ..plain_greedy(24, 512)
    };
    let out = model.generate(&prompt, &cfg).unwrap().tokens;
    assert!(!out.contains(&full[0]) && !out.contains(&full[1]));
}

#[test]
fn batch_results_equal_single_results() {
    for folder in ["gret", "swa"] {
        let model = load(folder);
        let toks = expected(folder).tokens;
        // Different lengths: shorter than, equal to and longer than the window (32) and a chunk.
        let prompts = vec![
            toks[..5].to_vec(),
            toks[10..50].to_vec(),
            toks[60..160].to_vec(),
            toks[200..201].to_vec(),
        ];
        for cfg in [
            plain_greedy(30, 48),
            GenerationConfig {
                sampling: Sampling {
                    temperature: 1.0,
                    top_p: Some(0.9),
                    ..Sampling::default()
                },
                seed: 3,
                ..plain_greedy(30, 48)
            },
            // A stop token makes rows finish at different times.
            GenerationConfig {
                stop_tokens: vec![toks[3]],
                ..plain_greedy(30, 48)
            },
        ] {
            let batch = model.generate_batch(&prompts, &cfg).unwrap();
            for (prompt, got) in prompts.iter().zip(&batch) {
                let alone = model.generate(prompt, &cfg).unwrap();
                assert_eq!(
                    got.tokens,
                    alone.tokens,
                    "{folder}: prompt of {}",
                    prompt.len()
                );
                assert_eq!(got.stop_reason, alone.stop_reason);
            }
        }
    }
}

#[test]
fn bad_settings_and_inputs_are_errors() {
    let model = load("gret");
    let prompt = [5u32, 6, 7];
    let bad_sampling = [
        Sampling {
            temperature: -1.0,
            ..Sampling::default()
        },
        Sampling {
            temperature: f32::NAN,
            ..Sampling::default()
        },
        Sampling {
            top_p: Some(0.0),
            ..Sampling::default()
        },
        Sampling {
            top_p: Some(1.5),
            ..Sampling::default()
        },
        Sampling {
            top_k: Some(0),
            ..Sampling::default()
        },
    ];
    for sampling in bad_sampling {
        let cfg = GenerationConfig {
            sampling: sampling.clone(),
            ..GenerationConfig::default()
        };
        assert!(
            matches!(model.generate(&prompt, &cfg), Err(Error::Generation(_))),
            "{sampling:?}"
        );
        assert!(matches!(
            model.generate_batch(&[prompt.to_vec()], &cfg),
            Err(Error::Generation(_))
        ));
    }
    let cfg = GenerationConfig::greedy(4);
    assert!(matches!(model.generate(&[], &cfg), Err(Error::Input(_))));
    assert!(matches!(
        model.generate(&[1, 256], &cfg),
        Err(Error::Input(_))
    ));
    assert!(matches!(
        model.generate_batch(&[vec![1], vec![]], &cfg),
        Err(Error::Input(_))
    ));
    let cfg = GenerationConfig {
        prefill_chunk: 0,
        ..GenerationConfig::greedy(4)
    };
    assert!(matches!(
        model.generate(&prompt, &cfg),
        Err(Error::Generation(_))
    ));
}

#[test]
fn prompts_beyond_the_position_limit_are_errors() {
    let dir = fixture("gret");
    let mut cfg = Config::from_file(dir.join("params.json")).unwrap();
    cfg.max_positions = 50;
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(
            &[dir.join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
        .unwrap()
    };
    let model = Model::new(cfg, vb).unwrap();
    let prompt = vec![3u32; 45];
    assert!(model
        .generate(&prompt, &GenerationConfig::greedy(5))
        .is_ok());
    assert!(matches!(
        model.generate(&prompt, &GenerationConfig::greedy(6)),
        Err(Error::Input(_))
    ));
    assert!(matches!(
        model.generate(&[3; 51], &GenerationConfig::greedy(1)),
        Err(Error::Input(_))
    ));
}

/// The one decode loop, batched: each row streams its own tokens (the callback gets the row),
/// can be stopped alone, and continues from its own cache; a row that stops leaves the batch at
/// once, so its cache holds exactly its prompt and its tokens but the last, as if it had run
/// alone.
#[test]
fn batched_rows_stream_stop_alone_and_continue_their_own_caches() {
    for folder in ["gret", "swa"] {
        let model = load(folder);
        let toks = expected(folder).tokens;
        let system = [&toks[..30], &toks[40..47], &toks[100..101]];
        let users = vec![
            toks[30..35].to_vec(),
            toks[50..90].to_vec(),
            toks[120..123].to_vec(),
        ];
        let cfg = GenerationConfig {
            stop_tokens: vec![toks[7]],
            ..plain_greedy(20, 16)
        };
        // Alone: each row from a cache holding its system prompt; row 1 stopped after 4 tokens.
        let mut alone = Vec::new();
        for (r, (sys, user)) in system.iter().zip(&users).enumerate() {
            let mut cache = model.new_cache(1).unwrap();
            model.prefill(&ids(sys), &mut cache).unwrap();
            let mut n = 0;
            let out = model
                .generate_from(&mut cache, user, &cfg, |_| {
                    n += 1;
                    if r == 1 && n == 4 {
                        ControlFlow::Break(())
                    } else {
                        ControlFlow::Continue(())
                    }
                })
                .unwrap();
            alone.push((out, cache));
        }
        // Together, from the same kind of caches.
        let mut caches: Vec<_> = system
            .iter()
            .map(|sys| {
                let mut cache = model.new_cache(1).unwrap();
                model.prefill(&ids(sys), &mut cache).unwrap();
                cache
            })
            .collect();
        let mut streamed = vec![Vec::new(); 3];
        let outs = model
            .generate_batch_from(&mut caches, &users, &cfg, |row, tok| {
                streamed[row].push(tok);
                if row == 1 && streamed[1].len() == 4 {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            })
            .unwrap();
        for r in 0..3 {
            let (single, single_cache) = &mut alone[r];
            assert_eq!(outs[r].tokens, single.tokens, "{folder} row {r}");
            assert_eq!(outs[r].stop_reason, single.stop_reason, "{folder} row {r}");
            assert_eq!(streamed[r], single.tokens, "{folder} row {r}");
            assert_eq!(
                caches[r].positions(),
                single_cache.positions(),
                "{folder} row {r}"
            );
            // The cache a row left behind continues exactly like the one that ran alone.
            let tok = candle_core::Tensor::new(&[3u32], &Device::Cpu).unwrap();
            let batched = model.step(&tok, &mut caches[r]).unwrap();
            let single = model.step(&tok, single_cache).unwrap();
            let diff = common::max_abs_diff(&batched, &single);
            assert!(diff < 1e-5, "{folder} row {r}: {diff}");
        }
        assert_eq!(outs[1].stop_reason, StopReason::Callback);
        assert_eq!(outs[1].tokens.len(), 4);
    }
}

/// Log-softmax by hand, in f64, of `row / temperature` with the suppressed ids removed.
fn log_softmax_by_hand(row: &[f32], temperature: f64, suppressed: &[u32]) -> Vec<f64> {
    let x: Vec<f64> = row
        .iter()
        .enumerate()
        .map(|(i, &l)| {
            if suppressed.contains(&(i as u32)) {
                f64::NEG_INFINITY
            } else {
                l as f64 / temperature
            }
        })
        .collect();
    let max = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let lse = max + x.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
    x.iter().map(|v| v - lse).collect()
}

/// Logprobs are the log-softmax of the logits after suppression and temperature (before
/// top-p), recomputed here from a cache-free full forward at every step.
#[test]
fn logprobs_are_the_log_softmax_of_the_processed_logits() {
    let model = load("gret");
    let prompt = expected("gret").tokens[..40].to_vec();
    for (temperature, top_p) in [(0.0f32, None), (0.7, Some(0.9))] {
        let cfg = GenerationConfig {
            sampling: Sampling {
                temperature,
                top_p,
                ..Sampling::default()
            },
            logprobs: Some(5),
            suppress_tokens: vec![3, 9],
            stop_tokens: vec![],
            seed: 4,
            ..GenerationConfig::greedy(12)
        };
        let out = model.generate(&prompt, &cfg).unwrap();
        assert_eq!(out.logprobs.len(), 12);
        let t = if temperature == 0.0 {
            1.0
        } else {
            temperature as f64
        };
        let mut seq = prompt.clone();
        for (lp, &tok) in out.logprobs.iter().zip(&out.tokens) {
            let mut cache = model.new_cache(1).unwrap();
            let logits = model.forward(&ids(&seq), &mut cache).unwrap();
            let row = logits
                .squeeze(0)
                .unwrap()
                .get(seq.len() - 1)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let want = log_softmax_by_hand(&row, t, &[3, 9]);
            assert_eq!(lp.token, tok);
            assert!((lp.logprob as f64 - want[tok as usize]).abs() < 1e-4);
            let mut order: Vec<usize> = (0..want.len()).collect();
            order.sort_by(|&a, &b| want[b].total_cmp(&want[a]).then(a.cmp(&b)));
            assert_eq!(lp.top.len(), 5);
            for ((id, v), &i) in lp.top.iter().zip(&order) {
                assert!((*v as f64 - want[i]).abs() < 1e-4, "{v} vs {}", want[i]);
                assert!((want[*id as usize] - want[i]).abs() < 1e-6);
            }
            seq.push(tok);
        }
        // Without alternatives: the same chosen log-probabilities, no list.
        let bare = GenerationConfig {
            logprobs: Some(0),
            ..cfg
        };
        let bare = model.generate(&prompt, &bare).unwrap();
        assert_eq!(bare.tokens, out.tokens);
        for (a, b) in bare.logprobs.iter().zip(&out.logprobs) {
            assert!(a.top.is_empty());
            assert_eq!(a.logprob, b.logprob);
        }
    }
}

/// Stop strings on the text path: the text ends before the first stop string, the pieces
/// streamed add up to it, and a stop string without a tokenizer is an error.
#[test]
fn stop_strings_end_the_text_before_them() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/models/shakespeare");
    let model = Model::load(dir, &Device::Cpu, DType::F32).unwrap();
    let tokenizer = yoco::Tokenizer::from_model_dir(dir).unwrap();
    let cfg = GenerationConfig {
        max_new_tokens: 80,
        seed: 3,
        ..GenerationConfig::default()
    }
    .for_tokenizer(&tokenizer);
    let (full, _) = model
        .generate_text(
            &tokenizer,
            "MACBETH.\n",
            &cfg,
            |_| ControlFlow::Continue(()),
        )
        .unwrap();
    // Every line break is a stop: the text is the first line.
    let first_line = &full[..full.find('\n').unwrap()];
    let stops = GenerationConfig {
        stop_strings: vec!["\n".into()],
        ..cfg.clone()
    };
    let mut pieces = String::new();
    let (text, out) = model
        .generate_text(&tokenizer, "MACBETH.\n", &stops, |p| {
            pieces.push_str(p);
            ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(text, first_line);
    assert_eq!(pieces, first_line);
    assert_eq!(out.stop_reason, StopReason::StopString(0));
    assert!(matches!(
        model.generate(&[5, 6], &stops),
        Err(Error::Generation(_))
    ));
    let empty = GenerationConfig {
        stop_strings: vec![String::new()],
        ..cfg
    };
    assert!(matches!(
        model.generate_text(&tokenizer, "A", &empty, |_| ControlFlow::Continue(())),
        Err(Error::Generation(_))
    ));
}
