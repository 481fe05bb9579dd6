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
    start_dir(std::path::Path::new(MODEL), max_sequences, max_queue)
}

fn start_dir(dir: &std::path::Path, max_sequences: usize, max_queue: usize) -> Server {
    start_with(dir, max_sequences, max_queue, |_| {})
}

/// A server on `dir`'s model, its state set up by `configure` before it serves.
fn start_with(
    dir: &std::path::Path,
    max_sequences: usize,
    max_queue: usize,
    configure: impl FnOnce(&app::AppState),
) -> Server {
    let model = Arc::new(Model::load(dir, &Device::Cpu, DType::F32).unwrap());
    let tokenizer = Arc::new(Tokenizer::from_model_dir(dir).unwrap());
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
    configure(&state);
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
    stream_at(server, "/v1/completions", body)
}

fn stream_at(server: &Server, path: &str, body: &Value) -> Events<impl Read> {
    let resp = agent()
        .post(format!("{}{path}", server.base))
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
        r#"{"prompt": "A", "n": 0}"#.into(),
        r#"{"prompt": "A", "echo": true, "stream": true}"#.into(),
        r#"{"prompt": "A", "stop": ["a", "b", "c", "d", "e"]}"#.into(),
        r#"{"prompt": "A", "stop": ""}"#.into(),
        r#"{"prompt": []}"#.into(),
        r#"{"prompt": [1, 99999]}"#.into(),
        r#"{"prompt": ["A", "B"], "stream": true}"#.into(),
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

/// The shipped model with a chat template of its own (speakers' names, as its plays write them).
fn model_with_template() -> (std::path::PathBuf, TempModel) {
    let dir = std::env::temp_dir().join(format!("yoco-serve-chat-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["params.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(std::path::Path::new(MODEL).join(f), dir.join(f)).unwrap();
    }
    let template =
        "{% for m in messages %}{{ m['role'] | upper }}.\n{{ m['content'] }}\n\n{% endfor %}\
                    {% if add_generation_prompt %}ASSISTANT.\n{% endif %}";
    let config = json!({ "chat_template": template, "eos_token": "</s>" });
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
    (dir.clone(), TempModel(dir))
}

struct TempModel(std::path::PathBuf);

impl Drop for TempModel {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.0).ok();
    }
}

/// Reads a whole chat stream: the role of the first delta, the content, the reasoning, the
/// finish reason and the usage chunk if any, checking every chunk's shape.
fn read_chat_stream(mut events: Events<impl Read>) -> (String, String, String, String, Value) {
    let (mut role, mut content, mut reasoning) = (String::new(), String::new(), String::new());
    let (mut finish, mut usage) = (None, Value::Null);
    loop {
        let data = events.next_data().expect("the stream ended without [DONE]");
        if data == "[DONE]" {
            assert!(events.next_data().is_none(), "events after [DONE]");
            break;
        }
        let chunk: Value = serde_json::from_str(&data).unwrap();
        assert_eq!(chunk["object"], "chat.completion.chunk");
        if chunk["choices"].as_array().is_some_and(Vec::is_empty) {
            usage = chunk["usage"].clone();
            continue;
        }
        assert!(finish.is_none(), "a delta after the finish reason: {chunk}");
        let choice = &chunk["choices"][0];
        let delta = &choice["delta"];
        if let Some(r) = delta["role"].as_str() {
            assert!(role.is_empty(), "two role deltas");
            role = r.to_string();
        }
        content.push_str(delta["content"].as_str().unwrap_or(""));
        reasoning.push_str(delta["reasoning_content"].as_str().unwrap_or(""));
        if let Some(reason) = choice["finish_reason"].as_str() {
            finish = Some(reason.to_string());
        }
    }
    (
        role,
        content,
        reasoning,
        finish.expect("no finish reason"),
        usage,
    )
}

#[test]
fn chat_completions_render_the_template_and_give_the_library_s_text() {
    let (dir, _keep) = model_with_template();
    let server = start_dir(&dir, 4, 8);
    let messages = [
        yoco::ChatMessage::new("system", "A room in the castle."),
        yoco::ChatMessage::new("user", "What news, my lord?"),
    ];
    // What the library gives: the template rendered, then generation with the same settings.
    let model = Model::load(&dir, &Device::Cpu, DType::F32).unwrap();
    let tokenizer = Tokenizer::from_model_dir(&dir).unwrap();
    let prompt = tokenizer.apply_chat_template(&messages, true).unwrap();
    assert_eq!(
        tokenizer.decode(&prompt, false).unwrap(),
        "SYSTEM.\nA room in the castle.\n\nUSER.\nWhat news, my lord?\n\nASSISTANT.\n"
    );
    let cfg = GenerationConfig {
        max_new_tokens: 30,
        seed: 11,
        sampling: Sampling {
            temperature: 0.8,
            top_p: None,
            ..Sampling::default()
        },
        ..GenerationConfig::default()
    }
    .for_tokenizer(&tokenizer);
    let out = model.generate(&prompt, &cfg).unwrap();
    let expected = tokenizer.decode(&out.tokens, true).unwrap();

    let body = json!({
        "messages": [
            {"role": "system", "content": "A room in the castle."},
            {"role": "user", "content": [{"type": "text", "text": "What news, "}, {"type": "text", "text": "my lord?"}]},
        ],
        "max_completion_tokens": 30, "temperature": 0.8, "seed": 11,
        "stream_options": null,
    });
    let (status, answer) = post(&server, "/v1/chat/completions", &body.to_string());
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["object"], "chat.completion");
    let message = &answer["choices"][0]["message"];
    assert_eq!(message["role"], "assistant");
    assert_eq!(message["content"], expected.as_str());
    assert!(message.get("reasoning_content").is_none(), "{message}");
    assert_eq!(answer["usage"]["prompt_tokens"], prompt.len() as u64);
    assert_eq!(
        answer["usage"]["completion_tokens"],
        out.tokens.len() as u64
    );

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let events = stream_at(&server, "/v1/chat/completions", &streamed);
    let (role, content, reasoning, finish, usage) = read_chat_stream(events);
    assert_eq!(
        (role.as_str(), content.as_str(), reasoning.as_str()),
        ("assistant", expected.as_str(), "")
    );
    assert_eq!(
        finish,
        answer["choices"][0]["finish_reason"].as_str().unwrap()
    );
    assert_eq!(usage["completion_tokens"], out.tokens.len() as u64);

    // Log-probabilities in the chat format: one entry per token, `top_logprobs` alternatives.
    let mut with_lp = body.clone();
    with_lp["logprobs"] = json!(true);
    with_lp["top_logprobs"] = json!(3);
    let (_, answer) = post(&server, "/v1/chat/completions", &with_lp.to_string());
    let content = answer["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap();
    assert_eq!(content.len(), out.tokens.len());
    for entry in content {
        assert!(entry["logprob"].as_f64().unwrap() <= 0.0);
        assert_eq!(entry["top_logprobs"].as_array().unwrap().len(), 3);
        let bytes: Vec<u8> = entry["bytes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_u64().unwrap() as u8)
            .collect();
        assert_eq!(
            String::from_utf8_lossy(&bytes),
            entry["token"].as_str().unwrap()
        );
    }
}

#[test]
fn chat_without_a_template_continues_the_messages_as_plain_text() {
    let server = start(2, 4);
    let chat = json!({
        "messages": [{"role": "user", "content": "ROMEO."}, {"role": "user", "content": "O, she doth"}],
        "max_tokens": 20, "temperature": 0.7, "seed": 5,
    });
    let plain =
        json!({"prompt": "ROMEO.\nO, she doth", "max_tokens": 20, "temperature": 0.7, "seed": 5});
    let (s1, a) = post(&server, "/v1/chat/completions", &chat.to_string());
    let (s2, b) = post(&server, "/v1/completions", &plain.to_string());
    assert_eq!((s1, s2), (200, 200), "{a} {b}");
    assert_eq!(
        a["choices"][0]["message"]["content"],
        b["choices"][0]["text"]
    );
}

#[test]
fn bad_chat_requests_get_a_400_naming_the_field() {
    let server = start(2, 4);
    let user = json!([{"role": "user", "content": "hi"}]);
    let cases = [
        (json!({"messages": []}), "messages"),
        (
            json!({"messages": [{"role": "tool", "content": "x"}]}),
            "messages",
        ),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "image_url", "text": null}]}]}),
            "messages",
        ),
        (json!({"messages": user, "top_logprobs": 2}), "top_logprobs"),
        (
            json!({"messages": user, "max_tokens": 5, "max_completion_tokens": 5}),
            "max_completion_tokens",
        ),
        (json!({"messages": user, "n": 3}), "n"),
        (
            json!({"messages": user, "temperature": -1.0}),
            "temperature",
        ),
        (
            json!({"messages": user, "max_completion_tokens": 0}),
            "max_tokens",
        ),
    ];
    for (body, param) in cases {
        let (status, answer) = post(&server, "/v1/chat/completions", &body.to_string());
        assert_eq!(status, 400, "{body}: {answer}");
        assert_eq!(answer["error"]["param"], param, "{body}: {answer}");
    }
    let (status, answer) = post(
        &server,
        "/v1/chat/completions",
        r#"{"messages": [], "frob": 1}"#,
    );
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("frob"),
        "{answer}"
    );
    // The server goes on.
    let (status, _) = post(
        &server,
        "/v1/chat/completions",
        &json!({"messages": user, "max_tokens": 3}).to_string(),
    );
    assert_eq!(status, 200);
}

/// vLLM's tokenizer endpoints, as evaluation harnesses call them with `tokenizer_backend=remote`.
#[test]
fn tokenize_detokenize_and_tokenizer_info_speak_vllm_s_shapes() {
    let server = start(2, 4);
    let tokenizer = Tokenizer::from_model_dir(MODEL).unwrap();
    let text = "HAMLET.\nTo be, or not to be.";
    let (status, r) = post(&server, "/tokenize", &json!({"prompt": text}).to_string());
    assert_eq!(status, 200, "{r}");
    let want = tokenizer.encode(text, true).unwrap();
    assert_eq!(r["tokens"], json!(want));
    assert_eq!(r["count"], want.len());
    let (_, r) = post(
        &server,
        "/tokenize",
        &json!({"prompt": text, "add_special_tokens": false}).to_string(),
    );
    assert_eq!(r["tokens"], json!(tokenizer.encode(text, false).unwrap()));
    let (status, r) = post(&server, "/detokenize", &json!({"tokens": want}).to_string());
    assert_eq!(status, 200, "{r}");
    assert_eq!(
        r["prompt"],
        tokenizer.decode(&want, false).unwrap().as_str()
    );
    let (status, info) = get(&server, "/tokenizer_info");
    assert_eq!(status, 200);
    assert_eq!(info["eos_token"], "</s>");
    assert_eq!(info["bos_token"], "<s>");
    assert!(info["chat_template"].is_null());
    // Bad requests are 400s naming the problem.
    for (path, body) in [
        ("/tokenize", json!({"text": "x"})),
        ("/detokenize", json!({"tokens": [u32::MAX]})),
        ("/detokenize", json!({"tokens": "1,2"})),
    ] {
        let (status, r) = post(&server, path, &body.to_string());
        assert_eq!(status, 400, "{path} {body}: {r}");
        assert!(r["error"]["message"].is_string(), "{r}");
    }
}

/// `/metrics` read by a Prometheus text-format parser: requests by outcome, tokens, the engine's
/// gauges and the latency histograms count what was asked.
#[test]
fn metrics_count_requests_tokens_and_latencies() {
    let server = start(2, 4);
    let mut generated = 0u64;
    for seed in 0..3 {
        let body = json!({"prompt": "ROMEO.\n", "max_tokens": 10, "seed": seed});
        let (status, r) = post(&server, "/v1/completions", &body.to_string());
        assert_eq!(status, 200, "{r}");
        generated += r["usage"]["completion_tokens"].as_u64().unwrap();
    }
    let body = json!({"messages": [{"role": "user", "content": "JULIET."}], "max_tokens": 5, "seed": 1, "stream": true});
    let (_, _, _, _, _) = read_chat_stream(stream_at(&server, "/v1/chat/completions", &body));
    generated += 5;
    let (status, _) = post(
        &server,
        "/v1/completions",
        r#"{"prompt": "x", "max_tokens": 0}"#,
    );
    assert_eq!(status, 400);
    wait_until_idle(&server, Duration::from_secs(30));

    let text = agent()
        .get(format!("{}/metrics", server.base))
        .call()
        .unwrap()
        .into_body()
        .read_to_string()
        .unwrap();
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
    let value = |name: &str, outcome: Option<&str>| -> f64 {
        let s = scrape
            .samples
            .iter()
            .find(|s| {
                s.metric == name && outcome.is_none_or(|o| s.labels.get("outcome") == Some(o))
            })
            .unwrap_or_else(|| panic!("no {name} {outcome:?} in\n{text}"));
        match &s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            other => panic!("{name}: {other:?}"),
        }
    };
    assert_eq!(value("yoco_requests_total", Some("finished")), 4.0);
    assert_eq!(value("yoco_requests_total", Some("invalid")), 1.0);
    assert_eq!(value("yoco_requests_total", Some("cancelled")), 0.0);
    // The chat stream may stop before its 5 tokens; everything else is exact.
    let tokens = value("yoco_generation_tokens_total", None);
    assert!(
        tokens <= generated as f64 && tokens > (generated - 5) as f64,
        "{tokens}"
    );
    assert_eq!(value("yoco_running_sequences", None), 0.0);
    assert_eq!(value("yoco_queue_depth", None), 0.0);
    let histogram = |name: &str| {
        scrape
            .samples
            .iter()
            .find_map(|s| match (&s.value, s.metric == name) {
                (prometheus_parse::Value::Histogram(h), true) => Some(h.clone()),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no histogram {name} in\n{text}"))
    };
    // One first token per request that generated any; every other token is one gap.
    let ttft = histogram("yoco_time_to_first_token_seconds");
    let total = ttft.iter().map(|b| b.count).fold(0.0, f64::max);
    assert_eq!(total, 4.0);
    let itl = histogram("yoco_inter_token_latency_seconds");
    let gaps = itl.iter().map(|b| b.count).fold(0.0, f64::max);
    assert_eq!(gaps, tokens - 4.0);
}

/// What lm-evaluation-harness's `local-completions` sends for loglikelihood tasks (token-id
/// prompts, several per request, echo, one token, logprobs 1): the prompt tokens' log-
/// probabilities equal log_softmax of the full forward (what `score` computes), the first `null`.
#[test]
fn echo_with_logprobs_scores_the_prompts_as_the_library_does() {
    let server = start(4, 8);
    let model = Model::load(MODEL, &Device::Cpu, DType::F32).unwrap();
    let tokenizer = Tokenizer::from_model_dir(MODEL).unwrap();
    let a = tokenizer
        .encode("ROMEO.\nBut soft, what light", true)
        .unwrap();
    let b = tokenizer.encode("JULIET.\nO Romeo, Romeo!", true).unwrap();
    // Copied from the harness's request: model, prompt lists, max_tokens 1, temperature 0,
    // logprobs 1, echo, seed.
    let body = json!({
        "model": "shakespeare", "prompt": [a, b], "max_tokens": 1, "temperature": 0.0,
        "logprobs": 1, "seed": 1234, "echo": true,
    });
    let (status, r) = post(&server, "/v1/completions", &body.to_string());
    assert_eq!(status, 200, "{r}");
    let choices = r["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2);
    for (i, prompt) in [&a, &b].into_iter().enumerate() {
        let c = &choices[i];
        assert_eq!(c["index"], i);
        let lp = &c["logprobs"];
        let got = lp["token_logprobs"].as_array().unwrap();
        assert_eq!(
            got.len(),
            prompt.len() + 1,
            "the prompt and one generated token"
        );
        assert!(got[0].is_null() && lp["top_logprobs"][0].is_null());
        // What `score` computes: log_softmax of the full forward's logits.
        let mut cache = model.new_cache(1).unwrap();
        let logits = model
            .forward(
                &candle_core::Tensor::new(prompt.as_slice(), &Device::Cpu)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap(),
                &mut cache,
            )
            .unwrap()
            .squeeze(0)
            .unwrap();
        let want = candle_nn::ops::log_softmax(&logits, candle_core::D::Minus1)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for t in 1..prompt.len() {
            let w = want[t - 1][prompt[t] as usize];
            let g = got[t].as_f64().unwrap() as f32;
            assert!((g - w).abs() <= 1e-4, "prompt {i} token {t}: {g} vs {w}");
            assert_eq!(lp["top_logprobs"][t].as_object().unwrap().len(), 1);
        }
        let text = c["text"].as_str().unwrap();
        assert!(
            text.starts_with(&tokenizer.decode(prompt, false).unwrap()),
            "{text:?}"
        );
        let offsets = lp["text_offset"].as_array().unwrap();
        assert_eq!(offsets[0], 0);
    }
    assert_eq!(r["usage"]["prompt_tokens"], a.len() + b.len());
    // max_tokens 0 with echo: scoring only.
    let score = json!({"prompt": a, "max_tokens": 0, "logprobs": 0, "echo": true});
    let (status, r) = post(&server, "/v1/completions", &score.to_string());
    assert_eq!(status, 200, "{r}");
    assert_eq!(
        r["choices"][0]["logprobs"]["token_logprobs"]
            .as_array()
            .unwrap()
            .len(),
        a.len()
    );
    assert_eq!(r["usage"]["completion_tokens"], 0);
}

#[test]
fn several_prompts_give_one_choice_each_as_alone() {
    let server = start(4, 8);
    let prompts = ["ROMEO.\n", "JULIET.\n", "HAMLET.\n"];
    let body = json!({"prompt": prompts, "max_tokens": 12, "seed": 8, "temperature": 0.9});
    let (status, r) = post(&server, "/v1/completions", &body.to_string());
    assert_eq!(status, 200, "{r}");
    for (i, p) in prompts.iter().enumerate() {
        let alone = json!({"prompt": p, "max_tokens": 12, "seed": 8, "temperature": 0.9});
        let (_, one) = post(&server, "/v1/completions", &alone.to_string());
        assert_eq!(
            r["choices"][i]["text"], one["choices"][0]["text"],
            "prompt {i}"
        );
        assert_eq!(r["choices"][i]["index"], i);
    }
    for (body, param) in [
        (json!({"prompt": "x", "max_tokens": 0}), "max_tokens"),
        (
            json!({"prompt": "x", "echo": true, "stream": true}),
            "stream",
        ),
        (json!({"prompt": ["a", "b"], "stream": true}), "stream"),
        (json!({"prompt": vec!["a"; 65]}), "prompt"),
        (json!({"prompt": Vec::<String>::new()}), "prompt"),
    ] {
        let (status, r) = post(&server, "/v1/completions", &body.to_string());
        assert_eq!(status, 400, "{body}: {r}");
        assert_eq!(r["error"]["param"], param, "{body}: {r}");
    }
}

/// `n` samples are `n` requests with seeds seed, seed + 1, ...; `best_of` returns the samples of
/// highest mean log-probability per token, as OpenAI defines it.
#[test]
fn n_and_best_of_are_the_separate_requests_they_stand_for() {
    let server = start(4, 16);
    let alone = |seed: u64| {
        let body = json!({"prompt": "ROMEO.\n", "max_tokens": 10, "seed": seed, "logprobs": 0});
        let (_, r) = post(&server, "/v1/completions", &body.to_string());
        let c = &r["choices"][0];
        let lps: Vec<f64> = c["logprobs"]["token_logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let mean = lps.iter().sum::<f64>() / lps.len().max(1) as f64;
        (c["text"].as_str().unwrap().to_string(), mean)
    };
    let body = json!({"prompt": "ROMEO.\n", "max_tokens": 10, "seed": 40, "n": 3});
    let (status, r) = post(&server, "/v1/completions", &body.to_string());
    assert_eq!(status, 200, "{r}");
    // One prefill: the second and third samples start from the first's kept prompt state.
    assert_eq!(health(&server)["prefix_hits"], 2);
    for j in 0..3 {
        assert_eq!(
            r["choices"][j]["text"],
            alone(40 + j as u64).0.as_str(),
            "sample {j}"
        );
        assert_eq!(r["choices"][j]["index"], j);
    }
    let body = json!({"prompt": "ROMEO.\n", "max_tokens": 10, "seed": 40, "n": 1, "best_of": 3});
    let (_, r) = post(&server, "/v1/completions", &body.to_string());
    let best = (0..3)
        .map(|j| alone(40 + j))
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap();
    assert_eq!(r["choices"].as_array().unwrap().len(), 1);
    assert_eq!(r["choices"][0]["text"], best.0.as_str());
    for (body, param) in [
        (json!({"prompt": "A", "n": 2, "stream": true}), "stream"),
        (json!({"prompt": "A", "n": 3, "best_of": 2}), "best_of"),
        (json!({"prompt": ["a", "b"], "n": 40}), "n"),
    ] {
        let (status, r) = post(&server, "/v1/completions", &body.to_string());
        assert_eq!(status, 400, "{body}: {r}");
        assert_eq!(r["error"]["param"], param, "{body}: {r}");
    }
}

#[test]
fn a_request_past_the_timeout_is_cancelled_with_finish_reason_abort() {
    let server = start_with(std::path::Path::new(MODEL), 2, 4, |s| {
        s.set_request_timeout(Some(Duration::from_millis(150)))
    });
    let body = json!({"prompt": "ROMEO.\n", "max_tokens": 4900, "seed": 1});
    let (status, r) = post(&server, "/v1/completions", &body.to_string());
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["choices"][0]["finish_reason"], "abort", "{r}");
    assert!(r["usage"]["completion_tokens"].as_u64().unwrap() < 4900);
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let (_, finish) = read_stream(stream(&server, &streamed));
    assert_eq!(finish, "abort");
}
