//! `examples/serve` over real HTTP on loopback: each test starts the server on 127.0.0.1 port 0
//! and talks to it with a real client (ureq), server-sent events read event by event.

#[path = "../examples/serve/app.rs"]
mod app;

use std::io::{BufRead, BufReader, Read};
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use serde_json::{json, Value};
use yoco::{Engine, EngineConfig, GenerationConfig, Model, Sampling, Tokenizer};

const MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/shakespeare");

/// A server on its own runtime, stopped when dropped.
struct Server {
    base: String,
    _runtime: tokio::runtime::Runtime,
}

fn start(max_sequences: usize, max_queue: usize) -> Server {
    let model = Arc::new(Model::load(MODEL, &Device::Cpu, DType::F32).unwrap());
    let tokenizer = Arc::new(Tokenizer::from_model_dir(MODEL).unwrap());
    let engine = Engine::new(
        model,
        Some(tokenizer.clone()),
        EngineConfig {
            max_sequences,
            max_queue,
            ..EngineConfig::default()
        },
    )
    .unwrap();
    let state = Arc::new(app::AppState::new(
        engine,
        tokenizer,
        "shakespeare".into(),
        256,
        5000,
        512,
    ));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    runtime.spawn(app::serve(listener, state));
    Server {
        base,
        _runtime: runtime,
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into()
}

/// POSTs a raw body; returns the status and the body parsed as JSON.
fn post(server: &Server, path: &str, body: &str) -> (u16, Value) {
    let resp = agent()
        .post(format!("{}{path}", server.base))
        .header("content-type", "application/json")
        .send(body)
        .unwrap();
    let status = resp.status().as_u16();
    let text = resp.into_body().read_to_string().unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn get(server: &Server, path: &str) -> (u16, Value) {
    let resp = agent()
        .get(format!("{}{path}", server.base))
        .call()
        .unwrap();
    let status = resp.status().as_u16();
    let text = resp.into_body().read_to_string().unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// Server-sent events, one at a time: the `data` of each event (comments skipped).
struct Events<R: Read> {
    lines: std::io::Lines<BufReader<R>>,
}

impl<R: Read> Events<R> {
    fn next_data(&mut self) -> Option<String> {
        let mut data: Option<String> = None;
        for line in self.lines.by_ref() {
            let line = line.ok()?;
            if line.is_empty() {
                if data.is_some() {
                    return data;
                }
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            let value = line.strip_prefix("data:")?.trim_start();
            data.get_or_insert_with(String::new).push_str(value);
        }
        data
    }
}

fn stream(server: &Server, body: &Value) -> Events<impl Read> {
    let resp = agent()
        .post(format!("{}/v1/completions", server.base))
        .header("content-type", "application/json")
        .send(body.to_string())
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let content_type = resp.headers()["content-type"].to_str().unwrap().to_string();
    assert!(
        content_type.starts_with("text/event-stream"),
        "{content_type}"
    );
    Events {
        lines: BufReader::new(resp.into_body().into_reader()).lines(),
    }
}

/// Reads a whole stream: the text, the finish reason, and checks every event's shape.
fn read_stream(mut events: Events<impl Read>) -> (String, String) {
    let mut text = String::new();
    let mut finish = None;
    loop {
        let data = events.next_data().expect("the stream ended without [DONE]");
        if data == "[DONE]" {
            assert!(events.next_data().is_none(), "events after [DONE]");
            break;
        }
        let chunk: Value = serde_json::from_str(&data).unwrap();
        assert_eq!(chunk["object"], "text_completion");
        assert!(finish.is_none(), "a chunk after the finish reason");
        let choice = &chunk["choices"][0];
        text.push_str(choice["text"].as_str().unwrap());
        if let Some(reason) = choice["finish_reason"].as_str() {
            finish = Some(reason.to_string());
        }
    }
    (text, finish.expect("no finish reason"))
}

fn health(server: &Server) -> Value {
    get(server, "/health").1
}

fn wait_until_idle(server: &Server, timeout: Duration) -> Value {
    let t0 = Instant::now();
    loop {
        let h = health(server);
        if h["running"] == 0 && h["queued"] == 0 {
            return h;
        }
        assert!(t0.elapsed() < timeout, "still busy: {h}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn every_bad_request_gets_a_400_with_an_error_body_and_the_server_goes_on() {
    let server = start(4, 8);
    let long_prompt: Vec<u32> = vec![40; 300];
    let bad = [
        r#"{"prompt": "ROMEO.", "#.to_string(),
        "not json at all".into(),
        "".into(),
        r#"{"max_tokens": 4}"#.into(),
        r#"{"prompt": "A", "bogus_field": 1}"#.into(),
        r#"{"prompt": "A", "max_tokens": "ten"}"#.into(),
        r#"{"prompt": "A", "temperature": "hot"}"#.into(),
        r#"{"prompt": 42}"#.into(),
        r#"{"prompt": "A", "stream": "yes"}"#.into(),
        json!({"prompt": long_prompt}).to_string(),
        r#"{"prompt": "A", "max_tokens": 0}"#.into(),
        r#"{"prompt": "A", "max_tokens": 1000000000}"#.into(),
        r#"{"prompt": "A", "max_tokens": -3}"#.into(),
        r#"{"prompt": "A", "temperature": -0.5}"#.into(),
        r#"{"prompt": "A", "top_p": 0}"#.into(),
        r#"{"prompt": "A", "top_k": -7}"#.into(),
        r#"{"prompt": "A", "min_p": 2}"#.into(),
        r#"{"prompt": "A", "repetition_penalty": 0}"#.into(),
        r#"{"prompt": "A", "logprobs": 99}"#.into(),
        r#"{"prompt": "A", "n": 2}"#.into(),
        r#"{"prompt": "A", "echo": true}"#.into(),
        r#"{"prompt": "A", "stop": ["a", "b", "c", "d", "e"]}"#.into(),
        r#"{"prompt": "A", "stop": ""}"#.into(),
        r#"{"prompt": []}"#.into(),
        r#"{"prompt": [1, 99999]}"#.into(),
        r#"{"prompt": ["A", "B"]}"#.into(),
    ];
    for body in &bad {
        let (status, answer) = post(&server, "/v1/completions", body);
        assert_eq!(status, 400, "{body} -> {answer}");
        let error = &answer["error"];
        assert!(
            error["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{body} -> {answer}"
        );
        assert_eq!(error["type"], "invalid_request_error", "{body}");
    }
    // Another model, another path: 404 with the same kind of body.
    let (status, answer) = post(
        &server,
        "/v1/completions",
        r#"{"model": "gpt-4", "prompt": "A"}"#,
    );
    assert_eq!(status, 404);
    assert!(answer["error"]["message"].is_string());
    assert_eq!(get(&server, "/v1/nothing").0, 404);
    // Still serving.
    let (status, answer) = post(
        &server,
        "/v1/completions",
        r#"{"prompt": "ROMEO.\n", "max_tokens": 5, "seed": 1}"#,
    );
    assert_eq!(status, 200, "{answer}");
    assert!(answer["usage"]["completion_tokens"].as_u64().unwrap() <= 5);
    // An empty text is the BOS token alone: a prompt like any other.
    let (status, _) = post(
        &server,
        "/v1/completions",
        r#"{"prompt": "", "max_tokens": 2}"#,
    );
    assert_eq!(status, 200);
    assert_eq!(health(&server)["status"], "ok");
    let (status, models) = get(&server, "/v1/models");
    assert_eq!(status, 200);
    assert_eq!(models["data"][0]["id"], "shakespeare");
}

#[test]
fn plain_and_streamed_completions_give_the_library_s_text() {
    let server = start(4, 8);
    // What the library gives for the same settings.
    let model = Model::load(MODEL, &Device::Cpu, DType::F32).unwrap();
    let tokenizer = Tokenizer::from_model_dir(MODEL).unwrap();
    let cfg = GenerationConfig {
        max_new_tokens: 40,
        seed: 7,
        sampling: Sampling {
            temperature: 0.8,
            top_p: None,
            ..Sampling::default()
        },
        ..GenerationConfig::default()
    }
    .for_tokenizer(&tokenizer);
    let (expected, out) = model
        .generate_text(&tokenizer, "ROMEO.\n", &cfg, |_| ControlFlow::Continue(()))
        .unwrap();

    let body = json!({"prompt": "ROMEO.\n", "max_tokens": 40, "temperature": 0.8, "seed": 7});
    let (status, answer) = post(&server, "/v1/completions", &body.to_string());
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["object"], "text_completion");
    assert_eq!(answer["choices"][0]["text"], expected.as_str());
    assert_eq!(
        answer["usage"]["completion_tokens"],
        out.tokens.len() as u64
    );
    let reason = if out.tokens.len() == 40 {
        "length"
    } else {
        "stop"
    };
    assert_eq!(answer["choices"][0]["finish_reason"], reason);

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let (text, finish) = read_stream(stream(&server, &streamed));
    assert_eq!(text, expected);
    assert_eq!(finish, reason);

    // Token ids as the prompt give the same.
    let ids = tokenizer.encode("ROMEO.\n", true).unwrap();
    let mut by_ids = body.clone();
    by_ids["prompt"] = json!(ids);
    let (_, answer) = post(&server, "/v1/completions", &by_ids.to_string());
    assert_eq!(answer["choices"][0]["text"], expected.as_str());
}

#[test]
fn stop_strings_logprobs_and_usage_over_http() {
    let server = start(4, 8);
    let base = json!({"prompt": "HAMLET.\n", "max_tokens": 60, "seed": 3, "temperature": 0.7});
    let (_, full) = post(&server, "/v1/completions", &base.to_string());
    let full_text = full["choices"][0]["text"].as_str().unwrap().to_string();
    let first_line = &full_text[..full_text.find('\n').unwrap()];

    let mut stopped = base.clone();
    stopped["stop"] = json!("\n");
    stopped["stream"] = json!(true);
    let (text, finish) = read_stream(stream(&server, &stopped));
    assert_eq!(text, first_line);
    assert_eq!(finish, "stop");

    let mut with_logprobs = base.clone();
    with_logprobs["logprobs"] = json!(2);
    let (status, answer) = post(&server, "/v1/completions", &with_logprobs.to_string());
    assert_eq!(status, 200);
    assert_eq!(answer["choices"][0]["text"], full_text.as_str());
    let lp = &answer["choices"][0]["logprobs"];
    let n = answer["usage"]["completion_tokens"].as_u64().unwrap() as usize;
    assert_eq!(lp["tokens"].as_array().unwrap().len(), n);
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), n);
    for (v, top) in lp["token_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .zip(lp["top_logprobs"].as_array().unwrap())
    {
        let v = v.as_f64().unwrap();
        assert!(v <= 0.0);
        let top = top.as_object().unwrap();
        assert!(!top.is_empty() && top.len() <= 2);
        let best = top
            .values()
            .map(|x| x.as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        assert!(v <= best + 1e-6);
    }
    // The usage chunk of a stream.
    let mut usage = base.clone();
    usage["stream"] = json!(true);
    usage["stream_options"] = json!({"include_usage": true});
    let mut events = stream(&server, &usage);
    let mut last_chunk = Value::Null;
    while let Some(data) = events.next_data() {
        if data == "[DONE]" {
            break;
        }
        last_chunk = serde_json::from_str(&data).unwrap();
    }
    assert_eq!(last_chunk["choices"], json!([]));
    assert_eq!(
        last_chunk["usage"]["completion_tokens"],
        full["usage"]["completion_tokens"]
    );
}

#[test]
fn a_seed_gives_the_same_text_alone_and_under_load() {
    let server = start(8, 16);
    let body = |seed: u64| json!({"prompt": "KING LEAR.\n", "max_tokens": 30, "seed": seed, "temperature": 1.0});
    let alone: Vec<String> = (0..8)
        .map(|seed| {
            let (_, a) = post(&server, "/v1/completions", &body(seed).to_string());
            a["choices"][0]["text"].as_str().unwrap().to_string()
        })
        .collect();
    // Different seeds do differ (else the comparison below would prove little).
    assert!(alone.iter().any(|t| t != &alone[0]));
    let server = Arc::new(server);
    let threads: Vec<_> = (0..8)
        .map(|seed| {
            let server = server.clone();
            std::thread::spawn(move || {
                let mut b = body(seed);
                if seed % 2 == 0 {
                    b["stream"] = json!(true);
                    read_stream(stream(&server, &b)).0
                } else {
                    let (_, a) = post(&server, "/v1/completions", &b.to_string());
                    a["choices"][0]["text"].as_str().unwrap().to_string()
                }
            })
        })
        .collect();
    let together: Vec<String> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(together, alone);
    wait_until_idle(&server, Duration::from_secs(10));
}

#[test]
fn a_client_that_disconnects_mid_stream_cancels_its_sequence() {
    let server = start(4, 8);
    let body =
        json!({"prompt": "OTHELLO.\n", "max_tokens": 5000, "ignore_eos": true, "stream": true});
    let mut events = stream(&server, &body);
    for _ in 0..3 {
        let data = events.next_data().unwrap();
        assert!(data.starts_with('{'), "{data}");
    }
    assert_eq!(health(&server)["running"], 1);
    drop(events);
    let h = wait_until_idle(&server, Duration::from_secs(20));
    // It ended long before its 5000 tokens.
    assert!(h["steps"].as_u64().unwrap() < 5000, "{h}");
    assert_eq!(h["ended"], 1);
}

#[test]
fn a_full_queue_gets_a_429_and_the_server_recovers() {
    let server = Arc::new(start(1, 1));
    let long =
        json!({"prompt": "ROMEO.\n", "max_tokens": 5000, "ignore_eos": true, "stream": true});
    // One running...
    let mut running = stream(&server, &long);
    running.next_data().unwrap();
    // ...one waiting (its answer comes once the first is gone)...
    let waiting = {
        let server = server.clone();
        std::thread::spawn(move || {
            post(
                &server,
                "/v1/completions",
                r#"{"prompt": "JULIET.\n", "max_tokens": 3}"#,
            )
        })
    };
    let t0 = Instant::now();
    while health(&server)["queued"] != 1 {
        assert!(t0.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(5));
    }
    // ...and no room for a third.
    let (status, answer) = post(
        &server,
        "/v1/completions",
        r#"{"prompt": "A", "max_tokens": 3}"#,
    );
    assert_eq!(status, 429, "{answer}");
    assert!(answer["error"]["message"].is_string());
    drop(running);
    let (status, answer) = waiting.join().unwrap();
    assert_eq!(status, 200, "{answer}");
    wait_until_idle(&server, Duration::from_secs(20));
}
