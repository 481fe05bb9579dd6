//! The serving engine: sequences admitted and retired between steps, each with the tokens it
//! would have alone; cancellation; prefill interleaved with decoding; prefix reuse.

mod common;

use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use common::{expected, fixture, ids};
use yoco::{
    Engine, EngineConfig, Error, Event, Generation, GenerationConfig, Model, Request, Sampling,
    StopReason, Tokenizer,
};

fn load(folder: &str) -> Arc<Model> {
    Arc::new(Model::load(fixture(folder), &Device::Cpu, DType::F32).unwrap())
}

/// Sampled (so that a wrong row or a shared RNG would show), nothing suppressed, no stop id.
fn sampled(n: usize, seed: u64, chunk: usize) -> GenerationConfig {
    GenerationConfig {
        sampling: Sampling {
            temperature: 1.0,
            top_p: Some(0.95),
            ..Sampling::default()
        },
        seed,
        stop_tokens: vec![],
        suppress_tokens: vec![],
        prefill_chunk: chunk,
        ..GenerationConfig::greedy(n)
    }
}

fn no_prefix(max_sequences: usize) -> EngineConfig {
    EngineConfig {
        max_sequences,
        max_queue: 64,
        prefix_cache_bytes: 0,
    }
}

/// Waits (a bounded while) until the engine holds no sequence.
fn wait_idle(engine: &Engine) {
    let t0 = Instant::now();
    while engine.stats().running() + engine.stats().queued > 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{:?}",
            engine.stats()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn each_sequence_gets_the_tokens_it_would_get_alone() {
    for folder in ["gret", "swa"] {
        let model = load(folder);
        let toks = expected(folder).tokens;
        // Eight requests for four places: rows join while others decode, and leave at
        // different times (different lengths, one stop id).
        let requests: Vec<Request> = (0..8)
            .map(|i| {
                let start = 13 * i;
                let prompt = toks[start..start + 3 + 17 * i].to_vec();
                let mut cfg = sampled(10 + 7 * i, 100 + i as u64, 16);
                if i == 5 {
                    cfg.stop_tokens = vec![toks[2]];
                }
                Request::new(prompt, cfg)
            })
            .collect();
        let engine = Engine::new(model.clone(), None, no_prefix(4)).unwrap();
        let handles: Vec<_> = requests
            .iter()
            .map(|r| engine.submit(r.clone()).unwrap())
            .collect();
        let results: Vec<Generation> = handles.into_iter().map(|h| h.wait().unwrap()).collect();
        for (r, got) in requests.iter().zip(&results) {
            let alone = model.generate(&r.prompt, &r.config).unwrap();
            assert_eq!(
                got.tokens,
                alone.tokens,
                "{folder}: prompt of {}",
                r.prompt.len()
            );
            assert_eq!(got.stop_reason, alone.stop_reason, "{folder}");
        }
        let stats = engine.stats();
        assert_eq!(stats.ended, 8);
        assert_eq!(stats.running(), 0);
        // Batching happened: fewer steps than tokens.
        let tokens: usize = results.iter().map(|g| g.tokens.len()).sum();
        assert!(
            (stats.steps as usize) < tokens,
            "{stats:?} for {tokens} tokens"
        );
    }
}

#[test]
fn streamed_events_come_in_order_and_match_the_result() {
    let model = load("gret");
    let toks = expected("gret").tokens;
    let engine = Engine::new(model, None, no_prefix(2)).unwrap();
    let prompt = toks[..70].to_vec();
    let handle = engine
        .submit(Request::new(prompt, sampled(12, 9, 32)))
        .unwrap();
    let events: Vec<Event> = handle.collect();
    let progress: Vec<(usize, usize)> = events
        .iter()
        .filter_map(|e| match e {
            Event::Prefill { done, total } => Some((*done, *total)),
            _ => None,
        })
        .collect();
    assert_eq!(progress, [(32, 70), (64, 70), (70, 70)]);
    let streamed: Vec<u32> = events
        .iter()
        .filter_map(|e| match e {
            Event::Token(t) => Some(t.id),
            _ => None,
        })
        .collect();
    match events.last() {
        Some(Event::Finished { generation, .. }) => {
            assert_eq!(generation.tokens, streamed);
            assert_eq!(generation.tokens.len(), 12);
        }
        other => panic!("last event {other:?}"),
    }
}

#[test]
fn a_long_prompt_delays_the_others_by_one_chunk_per_token() {
    let model = load("gret");
    let toks = expected("gret").tokens;
    let engine = Engine::new(model, None, no_prefix(4)).unwrap();
    // The engine's thread calls these in the order things happen.
    let log: Arc<Mutex<Vec<(&'static str, bool)>>> = Arc::default();
    let watch = |name: &'static str| {
        let log = log.clone();
        move |event: Event| {
            let is_token = match event {
                Event::Token(_) => true,
                Event::Prefill { .. } => false,
                _ => return ControlFlow::Continue(()),
            };
            log.lock().unwrap().push((name, is_token));
            ControlFlow::Continue(())
        }
    };
    for name in ["a", "b"] {
        let request = Request::new(toks[..20].to_vec(), sampled(200, 1, 512));
        engine.submit_with(request, watch(name)).unwrap();
    }
    // 16K tokens in chunks of 512: 32 chunks.
    let long: Vec<u32> = toks.iter().copied().cycle().take(16 * 1024).collect();
    let (tx, rx) = std::sync::mpsc::channel();
    let forward = watch("long");
    engine
        .submit_with(
            Request::new(long, sampled(4, 2, 512)),
            move |event: Event| {
                if let Event::Finished { generation, .. } = &event {
                    let _ = tx.send(generation.clone());
                }
                forward(event)
            },
        )
        .unwrap();
    let long_result = rx.recv_timeout(Duration::from_secs(120)).unwrap();
    assert_eq!(long_result.tokens.len(), 4);
    wait_idle(&engine);

    let log = log.lock().unwrap();
    let chunks: Vec<usize> = log
        .iter()
        .enumerate()
        .filter(|(_, (name, token))| *name == "long" && !token)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(chunks.len(), 32);
    // While the long prompt was prefilled, sequence a got a token after every chunk: between
    // two of its tokens there is at most one chunk.
    let (first, last) = (chunks[0], chunks[31]);
    let a_tokens: Vec<usize> = log
        .iter()
        .enumerate()
        .filter(|(i, (name, token))| *name == "a" && *token && (first..=last).contains(i))
        .map(|(i, _)| i)
        .collect();
    assert!(a_tokens.len() >= 31, "{} tokens of a", a_tokens.len());
    for pair in a_tokens.windows(2) {
        let between = chunks
            .iter()
            .filter(|&&c| pair[0] < c && c < pair[1])
            .count();
        assert!(between <= 1, "{between} chunks between two tokens");
    }
}

#[test]
fn cancelled_and_dropped_sequences_leave_at_once() {
    let model = load("gret");
    let toks = expected("gret").tokens;
    let engine = Engine::new(model, None, no_prefix(1)).unwrap();
    // Running: cancelled after three tokens.
    let mut running = engine
        .submit(Request::new(toks[..10].to_vec(), sampled(100_000, 1, 64)))
        .unwrap();
    // Queued behind it (one place): cancelled before it starts.
    let queued = engine
        .submit(Request::new(toks[..12].to_vec(), sampled(5, 1, 64)))
        .unwrap();
    let mut seen = 0;
    while seen < 3 {
        if let Some(Event::Token(_)) = running.recv() {
            seen += 1;
        }
    }
    queued.cancel();
    running.cancel();
    let rest: Vec<Event> = running.collect();
    match rest.last() {
        Some(Event::Finished { generation, .. }) => {
            assert_eq!(generation.stop_reason, StopReason::Cancelled);
            assert!(generation.tokens.len() < 100_000);
        }
        other => panic!("{other:?}"),
    }
    let queued = queued.wait().unwrap();
    assert_eq!(queued.stop_reason, StopReason::Cancelled);
    assert!(queued.tokens.is_empty());
    wait_idle(&engine);
    assert_eq!(engine.stats().batch_bytes, 0);

    // Dropping a handle cancels its sequence too.
    let handle = engine
        .submit(Request::new(toks[..10].to_vec(), sampled(100_000, 1, 64)))
        .unwrap();
    std::thread::sleep(Duration::from_millis(50));
    drop(handle);
    wait_idle(&engine);
    assert_eq!(engine.stats().ended, 3);
}

#[test]
fn a_kept_prefix_starts_later_prompts_and_gives_the_tokens_of_a_cache_holding_it() {
    for folder in ["gret", "swa"] {
        let model = load(folder);
        let toks = expected(folder).tokens;
        let system = &toks[..48];
        let cfg = sampled(16, 5, 16);
        let engine = Engine::new(model.clone(), None, EngineConfig::default()).unwrap();
        let turn = |user: &[u32]| [system, user].concat();

        // The first request keeps its first 48 tokens; the second starts from them.
        let first = Request {
            keep_prefix: Some(system.len()),
            ..Request::new(turn(&toks[50..60]), cfg.clone())
        };
        let first = engine.generate(first).unwrap();
        assert_eq!(first.cached_tokens, 0);
        let second = engine
            .generate(Request::new(turn(&toks[70..95]), cfg.clone()))
            .unwrap();
        assert_eq!(second.cached_tokens, system.len(), "{folder}");
        assert_eq!(engine.stats().prefix_hits, 1);

        // What a cache holding the system prompt gives, continued by hand.
        let by_hand = |user: &[u32]| {
            let mut cache = model.new_cache(1).unwrap();
            model.prefill_chunked(&ids(system), &mut cache, 16).unwrap();
            model
                .generate_from(&mut cache, user, &cfg, |_| ControlFlow::Continue(()))
                .unwrap()
        };
        assert_eq!(first.tokens, by_hand(&toks[50..60]).tokens, "{folder}");
        assert_eq!(second.tokens, by_hand(&toks[70..95]).tokens, "{folder}");

        // Requests that arrive together: the first keeps the prefix, and the others look it up
        // when their turn to prefill comes, after it.
        let engine = Engine::new(model.clone(), None, EngineConfig::default()).unwrap();
        let users = [&toks[100..110], &toks[120..127], &toks[130..150]];
        let handles: Vec<_> = users
            .iter()
            .map(|user| {
                let request = Request {
                    keep_prefix: Some(system.len()),
                    ..Request::new(turn(user), cfg.clone())
                };
                engine.submit(request).unwrap()
            })
            .collect();
        for (i, (handle, user)) in handles.into_iter().zip(users).enumerate() {
            let out = handle.wait().unwrap();
            let reused = if i == 0 { 0 } else { system.len() };
            assert_eq!(out.cached_tokens, reused, "{folder} request {i}");
            assert_eq!(out.tokens, by_hand(user).tokens, "{folder} request {i}");
        }
        assert_eq!(engine.stats().prefix_hits, 2);
        let engine = Engine::new(model.clone(), None, EngineConfig::default()).unwrap();
        let second = engine
            .generate(Request::new(turn(&toks[70..95]), cfg.clone()))
            .unwrap();
        assert_eq!(second.cached_tokens, 0);

        // A prompt seen whole before starts from its end: nothing to prefill, same tokens.
        let again = engine
            .generate(Request::new(turn(&toks[70..95]), cfg.clone()))
            .unwrap();
        assert_eq!(again.cached_tokens, system.len() + 25);
        assert_eq!(again.tokens, second.tokens);
    }
}

#[test]
fn kept_prefixes_stay_within_their_memory_limit() {
    let model = load("gret");
    let toks = expected("gret").tokens;
    // Room for about two 100-token prompts' states.
    let one = {
        let mut cache = model.new_cache(1).unwrap();
        model.prefill(&ids(&toks[..100]), &mut cache).unwrap();
        cache.size_bytes() + 4 * model.config().vocab_size() + 400
    };
    let engine = Engine::new(
        model,
        None,
        EngineConfig {
            prefix_cache_bytes: 2 * one + one / 2,
            ..EngineConfig::default()
        },
    )
    .unwrap();
    for i in 0..5 {
        let prompt = toks[i..i + 100].to_vec();
        engine
            .generate(Request::new(prompt, sampled(2, 1, 64)))
            .unwrap();
        let stats = engine.stats();
        assert!(stats.prefix_bytes <= 2 * one + one / 2, "{stats:?}");
        assert!(stats.prefix_entries <= 2, "{stats:?}");
    }
    // The most recent prompt is still there; the first was evicted.
    let recent = engine
        .generate(Request::new(toks[4..104].to_vec(), sampled(2, 1, 64)))
        .unwrap();
    assert_eq!(recent.cached_tokens, 100);
    let evicted = engine
        .generate(Request::new(toks[0..100].to_vec(), sampled(2, 1, 64)))
        .unwrap();
    assert_eq!(evicted.cached_tokens, 0);
}

#[test]
fn text_stop_strings_and_logprobs_through_the_engine() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/models/shakespeare");
    let model = Arc::new(Model::load(dir, &Device::Cpu, DType::F32).unwrap());
    let tokenizer = Arc::new(Tokenizer::from_model_dir(dir).unwrap());
    let engine = Engine::new(model, Some(tokenizer.clone()), EngineConfig::default()).unwrap();
    let prompt = tokenizer.encode("KING HENRY.\n", true).unwrap();
    let cfg = GenerationConfig {
        max_new_tokens: 60,
        seed: 11,
        logprobs: Some(3),
        ..GenerationConfig::default()
    }
    .for_tokenizer(&tokenizer);

    let full = engine
        .generate(Request::new(prompt.clone(), cfg.clone()))
        .unwrap();
    let text = full.text.clone().unwrap();
    assert_eq!(text, tokenizer.decode(&full.tokens, true).unwrap());
    assert_eq!(full.logprobs.len(), full.tokens.len());
    for (lp, &t) in full.logprobs.iter().zip(&full.tokens) {
        assert_eq!(lp.token, t);
        assert_eq!(lp.top.len(), 3);
        assert!(lp.top.windows(2).all(|w| w[0].1 >= w[1].1));
        assert!(lp.logprob <= lp.top[0].1 && lp.logprob <= 0.0);
    }

    // A stop string from the middle of that text: the text ends just before it.
    let cut = text
        .char_indices()
        .map(|(i, _)| i)
        .find(|&i| i >= text.len() / 2)
        .unwrap();
    let stop: String = text[cut..].chars().take(3).collect();
    let expected_text = &text[..text.find(&stop).unwrap()];
    let handle = engine
        .submit(Request::new(
            prompt,
            GenerationConfig {
                stop_strings: vec!["never appears".into(), stop.clone()],
                ..cfg
            },
        ))
        .unwrap();
    let mut streamed = String::new();
    let mut result = None;
    for event in handle {
        match event {
            Event::Token(t) => {
                assert!(!t.text.contains(&stop));
                streamed.push_str(&t.text);
            }
            Event::Finished { tail, generation } => {
                streamed.push_str(&tail);
                result = Some(generation);
            }
            Event::Failed(e) => panic!("{e}"),
            Event::Prefill { .. } => {}
        }
    }
    let result = result.unwrap();
    assert_eq!(result.stop_reason, StopReason::StopString(1));
    assert_eq!(streamed, expected_text);
    assert_eq!(result.text.as_deref(), Some(expected_text));
    // The same tokens as the full run, up to the one that completed the stop string.
    assert_eq!(result.tokens, full.tokens[..result.tokens.len()]);
}

#[test]
fn bad_requests_and_a_full_queue_are_errors() {
    let model = load("gret");
    let engine = Engine::new(
        model.clone(),
        None,
        EngineConfig {
            max_sequences: 1,
            max_queue: 1,
            prefix_cache_bytes: 0,
        },
    )
    .unwrap();
    let cfg = sampled(4, 1, 64);
    let bad = [
        Request::new(vec![], cfg.clone()),
        Request::new(vec![1, 256], cfg.clone()),
        Request::new(
            vec![1, 2],
            GenerationConfig {
                stop_strings: vec!["x".into()],
                ..cfg.clone()
            },
        ),
        Request::new(
            vec![1, 2],
            GenerationConfig {
                sampling: Sampling {
                    temperature: -1.0,
                    ..Sampling::default()
                },
                ..cfg.clone()
            },
        ),
        Request::new(vec![1, 2], GenerationConfig::greedy(usize::MAX)),
        Request {
            keep_prefix: Some(3),
            ..Request::new(vec![1, 2], cfg.clone())
        },
    ];
    for r in bad {
        assert!(
            matches!(
                engine.submit(r.clone()),
                Err(Error::Input(_) | Error::Generation(_))
            ),
            "{r:?}"
        );
    }
    // One running, one waiting, the next refused; the engine goes on.
    let long = |n| Request::new(vec![1, 2, 3], sampled(n, 1, 64));
    let running = engine.submit(long(100_000)).unwrap();
    let t0 = Instant::now();
    while engine.stats().running() == 0 {
        assert!(t0.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(1));
    }
    let waiting = engine.submit(long(3)).unwrap();
    assert!(matches!(engine.submit(long(3)), Err(Error::Busy(_))));
    running.cancel();
    assert_eq!(waiting.wait().unwrap().tokens.len(), 3);
    assert!(Engine::new(model, None, no_prefix(0)).is_err());
}
