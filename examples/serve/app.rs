//! The HTTP side of `examples/serve`: an OpenAI-compatible completions API over a `yoco::Engine`.
//! Shared by the server (`main.rs`), the load benchmark (`examples/load.rs`) and the HTTP tests
//! (`tests/serve_http.rs`), which all include this file.
//!
//! * `POST /v1/completions`: `prompt` (a string, or an array of token ids), `max_tokens`,
//!   `temperature`, `top_p`, `top_k`, `min_p`, `repetition_penalty`, `seed`, `stop`,
//!   `logprobs`, `stream` (server-sent events in OpenAI's format, ending with `data: [DONE]`),
//!   `stream_options.include_usage`, and vLLM's `ignore_eos`; a list of prompts (one choice each,
//!   in order) and `echo` (the prompt's text and, with `logprobs`, its tokens' log-probabilities
//!   before the generated ones, the first `null`; `max_tokens: 0` scores without generating), as
//!   evaluation harnesses send them. OpenAI fields yoco does not implement are accepted only at
//!   their neutral value (`n: 1`, ...).
//! * `POST /v1/chat/completions`: `messages` (system, user, assistant; text content, or a list of
//!   text parts) rendered by the model directory's chat template (a Phi-4-mini-flash directory
//!   without one: the built-in Phi-4 format; a model without any: the messages' texts as plain
//!   continuation), `max_tokens` or `max_completion_tokens`, the sampling fields above, `stop`,
//!   `seed`, `logprobs` with `top_logprobs`, `stream` (deltas in `chat.completion.chunk`s). A
//!   reasoning model's `<think>…</think>` comes back apart, as `reasoning_content` beside
//!   `content`, in whole messages and in stream deltas (split exactly at the tags, wherever the
//!   tokens cut them).
//! * `POST /tokenize` (`{"prompt", "add_special_tokens"}` -> `{"count", "max_model_len",
//!   "tokens"}`), `POST /detokenize` (`{"tokens"}` -> `{"prompt"}`), `GET /tokenizer_info` (`bos_token`,
//!   `eos_token`, `pad_token`, `chat_template`, `model_max_length`): vLLM's shapes, which
//!   evaluation harnesses use to tokenize through the server.
//! * `GET /metrics`: Prometheus text format (see `metrics.rs`).
//! * `GET /v1/models`, `GET /health` (the engine's load).
//!
//! A bad request gets a 400 with OpenAI's error body `{"error": {"message", "type", "param",
//! "code"}}`; a full queue a 429. A client that goes away cancels its sequence.
#![allow(dead_code)]

#[path = "metrics.rs"]
mod metrics;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use yoco::{
    Canceller, ChatMessage, ChatPiece, Engine, Event, Generation, GenerationConfig, ModelConfig,
    ReasoningSplitter, Request, Sampling, StopReason, TokenLogprobs, Tokenizer,
};

/// Most alternatives per token that `logprobs` may ask for.
pub const MAX_LOGPROBS: usize = 20;
/// Most prompts in one request.
pub const MAX_PROMPTS: usize = 64;
/// Most samples in one request (`best_of` times the prompts).
pub const MAX_CHOICES: usize = 64;
/// Most stop strings per request (OpenAI's limit).
pub const MAX_STOPS: usize = 4;
/// What a `-inf` log-probability is written as (JSON has no infinity; vLLM's convention).
const NEG_INF_LOGPROB: f32 = -9999.0;

/// What the handlers share.
pub struct AppState {
    pub engine: Engine,
    pub tokenizer: Arc<Tokenizer>,
    /// The name `/v1/models` lists and requests may give.
    pub model_name: String,
    /// Longest prompt accepted, in tokens.
    pub max_prompt_tokens: usize,
    /// Largest `max_tokens` accepted.
    pub max_new_tokens: usize,
    /// Prompt tokens prefilled per engine turn (the other sequences wait that long per token).
    pub prefill_chunk: usize,
    next_id: AtomicU64,
    /// Set when the server is shutting down: new requests get a 503.
    shutting_down: std::sync::atomic::AtomicBool,
    /// The cancellers of the requests being answered, to end them all at a shutdown's deadline.
    active: std::sync::Mutex<BTreeMap<u64, Canceller>>,
    /// What `/metrics` reports.
    metrics: Arc<metrics::Metrics>,
    /// Requests still running after this long are cancelled (finish reason `abort`).
    request_timeout: std::sync::Mutex<Option<std::time::Duration>>,
}

impl AppState {
    pub fn new(
        engine: Engine,
        tokenizer: Arc<Tokenizer>,
        model_name: String,
        max_prompt_tokens: usize,
        max_new_tokens: usize,
        prefill_chunk: usize,
    ) -> Self {
        AppState {
            engine,
            tokenizer,
            model_name,
            max_prompt_tokens,
            max_new_tokens,
            prefill_chunk,
            next_id: AtomicU64::new(0),
            shutting_down: std::sync::atomic::AtomicBool::new(false),
            active: std::sync::Mutex::new(BTreeMap::new()),
            metrics: Arc::new(metrics::Metrics::default()),
            request_timeout: std::sync::Mutex::new(None),
        }
    }

    /// A 503 while the server shuts down (counted as rejected); `None` otherwise.
    fn unavailable(&self) -> Option<Response> {
        if !self.shutting_down.load(Ordering::SeqCst) {
            return None;
        }
        self.metrics.count("rejected");
        let e = ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            kind: "server_error",
            message: "the server is shutting down".into(),
            param: None,
        };
        Some(e.into_response())
    }

    /// Submits `request` to the engine, its events observed by the metrics and sent into the
    /// returned channel (unbounded: the engine's thread never waits for a client).
    fn submit(
        &self,
        request: Request,
    ) -> (mpsc::UnboundedReceiver<Event>, yoco::Result<Canceller>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let (observer, mut clock) = (self.metrics.clone(), metrics::RequestClock::start());
        let submitted = self.engine.submit_with(request, move |event| {
            observer.observe(&event, &mut clock);
            match tx.send(event) {
                Ok(()) => ControlFlow::Continue(()),
                Err(_) => ControlFlow::Break(()),
            }
        });
        if let Err(yoco::Error::Busy(_)) = &submitted {
            self.metrics.count("rejected");
        }
        (rx, submitted)
    }

    /// Cancels requests still running after `timeout` (`None`: never).
    pub fn set_request_timeout(&self, timeout: Option<std::time::Duration>) {
        if let Ok(mut t) = self.request_timeout.lock() {
            *t = timeout;
        }
    }

    /// Cancels `canceller`'s request when the request timeout (if any) passes.
    fn arm_timeout(&self, canceller: &Canceller) {
        let timeout = self.request_timeout.lock().ok().and_then(|t| *t);
        if let Some(timeout) = timeout {
            let c = canceller.clone();
            tokio::spawn(async move {
                tokio::time::sleep(timeout).await;
                c.cancel();
            });
        }
    }

    /// Refuses new requests from now on (a 503).
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    /// Cancels every request being answered: each ends at once with its finish reason.
    pub fn cancel_all(&self) {
        if let Ok(active) = self.active.lock() {
            for c in active.values() {
                c.cancel();
            }
        }
    }
}

/// The routes.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/tokenizer_info", get(tokenizer_info))
        .route("/metrics", get(metrics_text))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .fallback(not_found)
        .with_state(state)
}

/// Serves `router(state)` on `listener` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, state: Arc<AppState>) -> std::io::Result<()> {
    axum::serve(listener, router(state)).await
}

/// Serves until `signal` completes, then shuts down gracefully: no new connections, new requests
/// on open ones get a 503, the requests being answered finish; those still running after `grace`
/// are cancelled (each ends with its finish reason). Returns when every connection is closed.
pub async fn serve_until(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    signal: impl std::future::Future<Output = ()> + Send + 'static,
    grace: std::time::Duration,
) -> std::io::Result<()> {
    let on_signal = state.clone();
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move {
            signal.await;
            on_signal.begin_shutdown();
            tokio::spawn(async move {
                tokio::time::sleep(grace).await;
                on_signal.cancel_all();
            });
        })
        .await
}

// ---------------------------------------------------------------------------------------------
// Errors

/// An OpenAI-style error response.
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
    param: Option<String>,
}

impl ApiError {
    fn bad(message: impl Into<String>, param: Option<&str>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            message: message.into(),
            param: param.map(str::to_string),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": Value::Null,
            }
        });
        (self.status, Json(body)).into_response()
    }
}

/// An engine error as the response it deserves.
fn engine_error(e: yoco::Error) -> ApiError {
    match e {
        yoco::Error::Busy(m) => ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            kind: "server_busy",
            message: format!("the server is busy, try again later: {m}"),
            param: None,
        },
        e @ (yoco::Error::Input(_) | yoco::Error::Generation(_) | yoco::Error::Tokenizer(_)) => {
            ApiError::bad(e.to_string(), None)
        }
        e => ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            kind: "server_error",
            message: e.to_string(),
            param: None,
        },
    }
}

async fn not_found() -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        kind: "invalid_request_error",
        message: "no such endpoint: the server has POST /v1/completions, GET /v1/models and \
                  GET /health"
            .into(),
        param: None,
    }
}

// ---------------------------------------------------------------------------------------------
// The request

/// A prompt: text, or token ids (also as a one-element list of either, as OpenAI allows).
#[derive(Deserialize)]
#[serde(untagged)]
enum Prompt {
    Text(String),
    Ids(Vec<u32>),
    Texts(Vec<String>),
    IdLists(Vec<Vec<u32>>),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// `POST /v1/completions`'s body. Unknown fields are refused (a typo would otherwise be
/// silently ignored); OpenAI's fields that yoco does not implement are accepted only at their
/// neutral values.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CompletionRequest {
    model: Option<String>,
    prompt: Prompt,
    max_tokens: Option<u64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    /// vLLM's extension; -1 or 0 turn it off.
    top_k: Option<i64>,
    min_p: Option<f32>,
    repetition_penalty: Option<f32>,
    seed: Option<u64>,
    stop: Option<Stop>,
    logprobs: Option<u64>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    /// vLLM's extension: keep generating past the end-of-sequence token.
    #[serde(default)]
    ignore_eos: bool,
    // Accepted at their neutral values only.
    n: Option<u64>,
    best_of: Option<u64>,
    echo: Option<bool>,
    frequency_penalty: Option<f32>,
    presence_penalty: Option<f32>,
    suffix: Option<String>,
    user: Option<String>,
}

/// A chat message's content: text, or a list of parts of which only text parts are taken.
#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

#[derive(Deserialize)]
struct InMessage {
    role: String,
    content: Option<Content>,
    /// Earlier replies may carry their reasoning back; it is not part of the prompt.
    #[serde(default)]
    reasoning_content: Option<String>,
    name: Option<String>,
}

/// `POST /v1/chat/completions`'s body (the same rules as [`CompletionRequest`]).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChatCompletionRequest {
    model: Option<String>,
    messages: Vec<InMessage>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    min_p: Option<f32>,
    repetition_penalty: Option<f32>,
    seed: Option<u64>,
    stop: Option<Stop>,
    logprobs: Option<bool>,
    top_logprobs: Option<u64>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    ignore_eos: bool,
    // Accepted at their neutral values only.
    n: Option<u64>,
    frequency_penalty: Option<f32>,
    presence_penalty: Option<f32>,
    user: Option<String>,
}

/// How to answer a checked request.
struct Job {
    stream: bool,
    include_usage: bool,
    logprobs: bool,
    /// A chat completion (messages and deltas) rather than a text completion.
    chat: bool,
    /// The prompt comes back before the generated text (with its log-probabilities).
    echo: bool,
    /// Alternatives per token in the log-probabilities.
    top: usize,
    /// The prompts' ids, in order.
    prompts: Vec<Vec<u32>>,
    /// Choices per prompt.
    n: usize,
    /// Samples per prompt, of which the `n` best (mean log-probability) are returned.
    best_of: usize,
}

/// serde's message for a body that is not the request (the field is named where serde says).
fn parse_error(e: serde_json::Error) -> ApiError {
    let message = match e.classify() {
        serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
            format!("the body is not valid JSON: {e}")
        }
        _ => format!("invalid request: {e}"),
    };
    ApiError::bad(message, None)
}

impl AppState {
    /// Checks a request and turns it into an engine request.
    fn job(&self, body: &[u8]) -> Result<(Vec<Request>, Job), ApiError> {
        let r: CompletionRequest = serde_json::from_slice(body).map_err(parse_error)?;
        self.checked(r, false)
    }

    /// Checks a chat request: its messages rendered into prompt ids, the rest checked as a
    /// completion's.
    fn chat_job(&self, body: &[u8]) -> Result<(Vec<Request>, Job), ApiError> {
        let r: ChatCompletionRequest = serde_json::from_slice(body).map_err(parse_error)?;
        if r.messages.is_empty() {
            return Err(ApiError::bad("messages is empty", Some("messages")));
        }
        let mut messages = Vec::with_capacity(r.messages.len());
        for m in &r.messages {
            if !matches!(
                m.role.as_str(),
                "system" | "user" | "assistant" | "developer"
            ) {
                return Err(ApiError::bad(
                    format!("role `{}` is not one of system, user, assistant", m.role),
                    Some("messages"),
                ));
            }
            let text = match &m.content {
                None => String::new(),
                Some(Content::Text(t)) => t.clone(),
                Some(Content::Parts(parts)) => {
                    let mut text = String::new();
                    for p in parts {
                        match (p.kind.as_str(), &p.text) {
                            ("text", Some(t)) => text.push_str(t),
                            (kind, _) => {
                                return Err(ApiError::bad(
                                    format!("content parts of type `{kind}` are not supported"),
                                    Some("messages"),
                                ))
                            }
                        }
                    }
                    text
                }
            };
            let _ = (&m.reasoning_content, &m.name);
            let role = if m.role == "developer" {
                "system"
            } else {
                m.role.as_str()
            };
            messages.push(ChatMessage::new(role, text));
        }
        let prompt = self.chat_prompt(&messages)?;
        if r.top_logprobs.is_some() && r.logprobs != Some(true) {
            return Err(ApiError::bad(
                "top_logprobs needs logprobs: true",
                Some("top_logprobs"),
            ));
        }
        if r.n.is_some_and(|n| n != 1) {
            return Err(ApiError::bad(
                "`n` is not supported for chat completions (only its default value is accepted)",
                Some("n"),
            ));
        }
        if r.max_tokens.is_some() && r.max_completion_tokens.is_some() {
            return Err(ApiError::bad(
                "give max_tokens or max_completion_tokens, not both",
                Some("max_completion_tokens"),
            ));
        }
        let completion = CompletionRequest {
            model: r.model,
            prompt: Prompt::Ids(prompt),
            max_tokens: r.max_completion_tokens.or(r.max_tokens),
            temperature: r.temperature,
            top_p: r.top_p,
            top_k: r.top_k,
            min_p: r.min_p,
            repetition_penalty: r.repetition_penalty,
            seed: r.seed,
            stop: r.stop,
            logprobs: match r.logprobs {
                Some(true) => Some(r.top_logprobs.unwrap_or(0)),
                _ => None,
            },
            stream: r.stream,
            stream_options: r.stream_options,
            ignore_eos: r.ignore_eos,
            n: r.n,
            best_of: None,
            echo: None,
            frequency_penalty: r.frequency_penalty,
            presence_penalty: r.presence_penalty,
            suffix: None,
            user: r.user,
        };
        self.checked(completion, true)
    }

    /// The prompt ids of a conversation: the directory's chat template; for a
    /// Phi-4-mini-flash model without one, the built-in Phi-4 format; for a model without any,
    /// the messages' texts one after another (plain continuation).
    fn chat_prompt(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, ApiError> {
        let bad = |e: yoco::Error| ApiError::bad(e.to_string(), Some("messages"));
        let template = self.tokenizer.chat_template().map_err(bad)?;
        match (template, self.engine.model().config()) {
            (Some(_), _) | (None, ModelConfig::Phi4Flash(_)) => self
                .tokenizer
                .apply_chat_template(messages, true)
                .map_err(bad),
            (None, _) => {
                let text: Vec<&str> = messages.iter().map(|m| m.content.as_str()).collect();
                self.encode(&text.join("\n"))
            }
        }
    }

    /// Checks a completion request (`chat`: it came from a chat request): one engine request per
    /// prompt (none when an echo only scores).
    fn checked(&self, r: CompletionRequest, chat: bool) -> Result<(Vec<Request>, Job), ApiError> {
        if let Some(m) = &r.model {
            if m != &self.model_name {
                return Err(ApiError {
                    status: StatusCode::NOT_FOUND,
                    kind: "invalid_request_error",
                    message: format!(
                        "model `{m}` does not exist; this server has `{}`",
                        self.model_name
                    ),
                    param: Some("model".into()),
                });
            }
        }
        let neutral = [
            (
                "frequency_penalty",
                r.frequency_penalty.is_none_or(|p| p == 0.0),
            ),
            (
                "presence_penalty",
                r.presence_penalty.is_none_or(|p| p == 0.0),
            ),
            ("suffix", r.suffix.as_deref().is_none_or(str::is_empty)),
        ];
        if let Some((name, _)) = neutral.iter().find(|(_, ok)| !ok) {
            return Err(ApiError::bad(
                format!("`{name}` is not supported (only its default value is accepted)"),
                Some(name),
            ));
        }
        let _ = &r.user;

        let echo = r.echo == Some(true);
        let prompts: Vec<Vec<u32>> = match r.prompt {
            Prompt::Text(text) => vec![self.encode(&text)?],
            Prompt::Ids(ids) => vec![ids],
            Prompt::Texts(texts) => texts
                .iter()
                .map(|t| self.encode(t))
                .collect::<Result<_, _>>()?,
            Prompt::IdLists(lists) => lists,
        };
        if prompts.is_empty() || prompts.len() > MAX_PROMPTS {
            return Err(ApiError::bad(
                format!("give 1 to {MAX_PROMPTS} prompts (got {})", prompts.len()),
                Some("prompt"),
            ));
        }
        let n = r.n.unwrap_or(1);
        let best_of = r.best_of.unwrap_or(n);
        if n == 0 || best_of < n || best_of as usize * prompts.len() > MAX_CHOICES {
            let param = if best_of < n || r.best_of.is_some() {
                "best_of"
            } else {
                "n"
            };
            return Err(ApiError::bad(
                format!(
                    "n ({n}) must be at least 1 and at most best_of ({best_of}), and best_of \
                     times the {} prompt(s) at most {MAX_CHOICES}",
                    prompts.len()
                ),
                Some(param),
            ));
        }
        if r.stream && (echo || prompts.len() > 1 || best_of > 1) {
            return Err(ApiError::bad(
                "streaming takes one prompt, one sample and no echo",
                Some("stream"),
            ));
        }
        let vocab = self.engine.model().config().vocab_size();
        for prompt in &prompts {
            if prompt.is_empty() {
                return Err(ApiError::bad("the prompt is empty", Some("prompt")));
            }
            if prompt.len() > self.max_prompt_tokens {
                return Err(ApiError::bad(
                    format!(
                        "the prompt has {} tokens; this server takes at most {}",
                        prompt.len(),
                        self.max_prompt_tokens
                    ),
                    Some("prompt"),
                ));
            }
            if let Some(bad) = prompt.iter().find(|&&t| t as usize >= vocab) {
                return Err(ApiError::bad(
                    format!("token id {bad} is outside the vocabulary of {vocab}"),
                    Some("prompt"),
                ));
            }
        }

        let max_tokens = r.max_tokens.unwrap_or(16);
        // With echo, 0 scores the prompt without generating.
        let least = u64::from(!echo);
        if max_tokens < least || max_tokens > self.max_new_tokens as u64 {
            return Err(ApiError::bad(
                format!(
                    "max_tokens must be in {least}..={} (got {max_tokens})",
                    self.max_new_tokens
                ),
                Some("max_tokens"),
            ));
        }
        let temperature = r.temperature.unwrap_or(1.0);
        if !(temperature.is_finite() && temperature >= 0.0) {
            return Err(ApiError::bad(
                format!("temperature must be >= 0 (got {temperature})"),
                Some("temperature"),
            ));
        }
        let top_p = r.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::bad(
                format!("top_p must be in (0, 1] (got {top_p})"),
                Some("top_p"),
            ));
        }
        let top_k = match r.top_k {
            None | Some(-1) | Some(0) => None,
            Some(k) if k > 0 => Some(k as usize),
            Some(k) => {
                return Err(ApiError::bad(
                    format!("top_k must be >= 1, or -1 or 0 for off (got {k})"),
                    Some("top_k"),
                ))
            }
        };
        let min_p = r.min_p.filter(|&p| p != 0.0);
        if let Some(p) = min_p {
            if !(0.0..=1.0).contains(&p) {
                return Err(ApiError::bad(
                    format!("min_p must be in [0, 1] (got {p})"),
                    Some("min_p"),
                ));
            }
        }
        let repetition_penalty = r.repetition_penalty.unwrap_or(1.0);
        if !(repetition_penalty.is_finite() && repetition_penalty > 0.0) {
            return Err(ApiError::bad(
                format!("repetition_penalty must be > 0 (got {repetition_penalty})"),
                Some("repetition_penalty"),
            ));
        }
        let stops = match r.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s],
            Some(Stop::Many(v)) => v,
        };
        if stops.len() > MAX_STOPS || stops.iter().any(String::is_empty) {
            return Err(ApiError::bad(
                format!("stop takes at most {MAX_STOPS} non-empty strings"),
                Some("stop"),
            ));
        }
        let logprobs = match r.logprobs {
            Some(n) if n > MAX_LOGPROBS as u64 => {
                return Err(ApiError::bad(
                    format!("logprobs must be in 0..={MAX_LOGPROBS} (got {n})"),
                    Some("logprobs"),
                ))
            }
            other => other.map(|n| n as usize),
        };
        let seed = r.seed.unwrap_or_else(|| {
            // Unseeded requests differ from one another, as OpenAI's do.
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            nanos ^ self.next_id.fetch_add(1, Ordering::Relaxed).rotate_left(32)
        });

        let mut config = GenerationConfig {
            max_new_tokens: max_tokens as usize,
            sampling: Sampling {
                temperature,
                top_k,
                top_p: (top_p < 1.0).then_some(top_p),
                min_p,
                repetition_penalty,
                ..Sampling::default()
            },
            seed,
            prefill_chunk: self.prefill_chunk,
            stop_strings: stops,
            logprobs,
            ..GenerationConfig::default()
        }
        .for_tokenizer(&self.tokenizer)
        .for_model(self.engine.model());
        if r.ignore_eos {
            config.stop_tokens.clear();
        }
        let job = Job {
            stream: r.stream,
            include_usage: r.stream_options.is_some_and(|o| o.include_usage),
            logprobs: logprobs.is_some(),
            chat,
            echo,
            top: logprobs.unwrap_or(0),
            prompts: prompts.clone(),
            n: n as usize,
            best_of: best_of as usize,
        };
        // best_of samples per prompt, sample j with seed + j; the first keeps its prompt's state
        // (the engine keeps every finished prompt), so the others start from its end: one
        // prefill per prompt. Picking the best needs every sample's log-probabilities.
        if best_of > n {
            config.logprobs = Some(config.logprobs.unwrap_or(0));
        }
        let requests = match max_tokens {
            0 => Vec::new(),
            _ => prompts
                .into_iter()
                .flat_map(|p| {
                    let config = &config;
                    (0..best_of).map(move |j| {
                        let mut c = config.clone();
                        c.seed = c.seed.wrapping_add(j);
                        Request::new(p.clone(), c)
                    })
                })
                .collect(),
        };
        Ok((requests, job))
    }

    fn encode(&self, text: &str) -> Result<Vec<u32>, ApiError> {
        self.tokenizer
            .encode(text, true)
            .map_err(|e| ApiError::bad(format!("cannot tokenize the prompt: {e}"), Some("prompt")))
    }

    fn completion_id(&self) -> String {
        format!("cmpl-{}", self.next_id.fetch_add(1, Ordering::Relaxed))
    }

    /// A token as OpenAI's logprobs show it: its own text (lossy for a partial character).
    fn token_text(&self, id: u32) -> String {
        self.tokenizer.decode(&[id], false).unwrap_or_default()
    }

    /// The `logprobs` object of a choice for these tokens, `offset` bytes into the text.
    fn logprobs_json(&self, lps: &[TokenLogprobs], mut offset: usize) -> Value {
        let finite = |x: f32| if x.is_finite() { x } else { NEG_INF_LOGPROB };
        let mut tokens = Vec::new();
        let mut token_logprobs = Vec::new();
        let mut top_logprobs = Vec::new();
        let mut text_offset = Vec::new();
        for lp in lps {
            let text = self.token_text(lp.token);
            text_offset.push(offset);
            offset += text.len();
            tokens.push(text);
            token_logprobs.push(finite(lp.logprob));
            let top: BTreeMap<String, f32> = lp
                .top
                .iter()
                .map(|&(id, v)| (self.token_text(id), finite(v)))
                .collect();
            top_logprobs.push(top);
        }
        json!({
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top_logprobs,
            "text_offset": text_offset,
        })
    }
}

impl AppState {
    /// The `logprobs` object of a text choice whose tokens may lack a log-probability (the
    /// first token of an echoed prompt: `null`, as OpenAI writes it).
    fn echo_logprobs_json(&self, entries: &[(u32, Option<TokenLogprobs>)]) -> Value {
        let finite = |x: f32| if x.is_finite() { x } else { NEG_INF_LOGPROB };
        let (mut tokens, mut token_logprobs, mut top_logprobs, mut text_offset) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut offset = 0;
        for (tok, lp) in entries {
            let text = self.token_text(*tok);
            text_offset.push(offset);
            offset += text.len();
            tokens.push(text);
            match lp {
                Some(lp) => {
                    token_logprobs.push(json!(finite(lp.logprob)));
                    let top: BTreeMap<String, f32> = lp
                        .top
                        .iter()
                        .map(|&(id, v)| (self.token_text(id), finite(v)))
                        .collect();
                    top_logprobs.push(json!(top));
                }
                None => {
                    token_logprobs.push(Value::Null);
                    top_logprobs.push(Value::Null);
                }
            }
        }
        json!({
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top_logprobs,
            "text_offset": text_offset,
        })
    }

    /// The `logprobs` object of a chat choice: `{"content": [{token, logprob, bytes,
    /// top_logprobs: [{token, logprob, bytes}]}]}`.
    fn chat_logprobs_json(&self, lps: &[TokenLogprobs]) -> Value {
        let finite = |x: f32| if x.is_finite() { x } else { NEG_INF_LOGPROB };
        let entry = |id: u32, lp: f32| {
            let text = self.token_text(id);
            json!({ "token": text, "logprob": finite(lp), "bytes": text.as_bytes() })
        };
        let content: Vec<Value> = lps
            .iter()
            .map(|lp| {
                let mut e = entry(lp.token, lp.logprob);
                let top: Vec<Value> = lp.top.iter().map(|&(id, v)| entry(id, v)).collect();
                e["top_logprobs"] = Value::Array(top);
                e
            })
            .collect();
        json!({ "content": content })
    }
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn finish_reason(reason: StopReason) -> &'static str {
    match reason {
        StopReason::MaxTokens => "length",
        StopReason::StopToken(_) | StopReason::StopString(_) => "stop",
        StopReason::Callback | StopReason::Cancelled => "abort",
    }
}

fn usage(g: &Generation) -> Value {
    json!({
        "prompt_tokens": g.prompt_tokens,
        "completion_tokens": g.tokens.len(),
        "total_tokens": g.prompt_tokens + g.tokens.len(),
        "prompt_tokens_details": { "cached_tokens": g.cached_tokens },
    })
}

// ---------------------------------------------------------------------------------------------
// Handlers

async fn health(State(state): State<Arc<AppState>>) -> Json<Value> {
    let s = state.engine.stats();
    Json(json!({
        "status": "ok",
        "running": s.running(),
        "prefilling": s.prefilling,
        "decoding": s.decoding,
        "queued": s.queued,
        "steps": s.steps,
        "prefill_chunks": s.prefill_chunks,
        "prefix_hits": s.prefix_hits,
        "ended": s.ended,
    }))
}

async fn models(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": state.model_name,
            "object": "model",
            "created": 0,
            "owned_by": "yoco",
        }],
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenizeRequest {
    model: Option<String>,
    prompt: String,
    /// vLLM's default: true (the BOS token where the tokenizer has one).
    add_special_tokens: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DetokenizeRequest {
    model: Option<String>,
    tokens: Vec<u32>,
}

async fn tokenize(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    let r: TokenizeRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return parse_error(e).into_response(),
    };
    let _ = &r.model;
    match state
        .tokenizer
        .encode(&r.prompt, r.add_special_tokens.unwrap_or(true))
    {
        Ok(tokens) => Json(json!({
            "count": tokens.len(),
            "max_model_len": state.engine.model().config().max_positions(),
            "tokens": tokens,
        }))
        .into_response(),
        Err(e) => ApiError::bad(format!("cannot tokenize: {e}"), Some("prompt")).into_response(),
    }
}

async fn detokenize(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    let r: DetokenizeRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return parse_error(e).into_response(),
    };
    let _ = &r.model;
    let vocab = state.engine.model().config().vocab_size();
    if let Some(bad) = r.tokens.iter().find(|&&t| t as usize >= vocab) {
        return ApiError::bad(
            format!("token id {bad} is outside the vocabulary of {vocab}"),
            Some("tokens"),
        )
        .into_response();
    }
    match state.tokenizer.decode(&r.tokens, false) {
        Ok(prompt) => Json(json!({ "prompt": prompt })).into_response(),
        Err(e) => ApiError::bad(format!("cannot detokenize: {e}"), Some("tokens")).into_response(),
    }
}

async fn tokenizer_info(State(state): State<Arc<AppState>>) -> Json<Value> {
    let t = &state.tokenizer;
    let text = |id: Option<u32>| id.and_then(|id| t.inner().id_to_token(id));
    let pad = t
        .inner()
        .token_to_id("<pad>")
        .and_then(|id| t.inner().id_to_token(id));
    let template = t
        .chat_template()
        .ok()
        .flatten()
        .map(|c| c.source().to_string());
    Json(json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": text(t.bos_id()),
        "eos_token": text(t.eos_id()),
        "pad_token": pad.or_else(|| text(t.eos_id())),
        "chat_template": template,
        "model_max_length": state.engine.model().config().max_positions(),
    }))
}

/// Cancels its sequence when dropped: the handler's future (a client that leaves before the
/// answer) or the event stream (a client that leaves mid-stream) goes, and so does the work.
struct CancelOnDrop(Canceller, Option<(Arc<AppState>, u64)>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
        if let Some((state, key)) = &self.1 {
            if let Ok(mut active) = state.active.lock() {
                active.remove(key);
            }
        }
    }
}

async fn completions(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    match state.job(&body) {
        Ok((mut requests, job)) => {
            let id = state.completion_id();
            match (
                requests.pop(),
                requests.is_empty() && !job.echo && job.best_of == 1,
            ) {
                (Some(request), true) => respond(state, request, job, id).await,
                (last, _) => {
                    requests.extend(last);
                    several(state, requests, job, id).await
                }
            }
        }
        Err(e) => {
            state.metrics.count("invalid");
            e.into_response()
        }
    }
}

/// Several prompts, or an echo: every prompt's request submitted at once (the engine batches
/// them), each prompt scored (with echo and logprobs) chunk by chunk on a blocking thread, then
/// one choice per prompt in order.
async fn several(state: Arc<AppState>, requests: Vec<Request>, job: Job, id: String) -> Response {
    if let Some(refused) = state.unavailable() {
        return refused;
    }
    let mut pending = Vec::with_capacity(requests.len());
    for request in requests {
        match state.submit(request) {
            (rx, Ok(canceller)) => {
                state.arm_timeout(&canceller);
                pending.push((rx, CancelOnDrop(canceller, None)))
            }
            (_, Err(e)) => return engine_error(e).into_response(),
        }
    }
    let scored = if job.echo && job.logprobs {
        let (scorer, prompts, top) = (state.clone(), job.prompts.clone(), job.top);
        let scored = tokio::task::spawn_blocking(move || {
            prompts
                .iter()
                .map(|p| scorer.engine.model().prompt_logprobs(p, top))
                .collect::<yoco::Result<Vec<_>>>()
        })
        .await;
        match scored {
            Ok(Ok(s)) => Some(s),
            Ok(Err(e)) => return engine_error(e).into_response(),
            Err(e) => return engine_error(yoco::Error::Engine(e.to_string())).into_response(),
        }
    } else {
        None
    };
    let mut generations = Vec::with_capacity(pending.len());
    for (mut rx, _guard) in pending {
        let mut got = None;
        while let Some(event) = rx.recv().await {
            match event {
                Event::Finished { generation, .. } => {
                    got = Some(generation);
                    break;
                }
                Event::Failed(e) => return engine_error(e).into_response(),
                Event::Prefill { .. } | Event::Token(_) => {}
            }
        }
        match got {
            Some(g) => generations.push(g),
            None => {
                return engine_error(yoco::Error::Engine("the engine stopped".into()))
                    .into_response()
            }
        }
    }
    let (mut prompt_tokens, mut completion_tokens) = (0, 0);
    let mut choices = Vec::with_capacity(job.prompts.len() * job.n);
    let samples = if generations.is_empty() {
        0
    } else {
        job.best_of
    };
    for (i, prompt) in job.prompts.iter().enumerate() {
        prompt_tokens += prompt.len();
        let mut mine: Vec<Option<&Generation>> = generations
            .get(i * samples..(i + 1) * samples)
            .map_or_else(Vec::new, |g| g.iter().map(Some).collect());
        completion_tokens += mine.iter().flatten().map(|g| g.tokens.len()).sum::<usize>();
        if mine.is_empty() {
            mine = vec![None; job.n];
        } else if job.best_of > job.n {
            // OpenAI's best: the highest mean log-probability per token (stable among ties).
            let mean = |g: &Generation| {
                let n = g.logprobs.len().max(1) as f64;
                g.logprobs.iter().map(|l| f64::from(l.logprob)).sum::<f64>() / n
            };
            mine.sort_by(|a, b| {
                let (a, b) = (a.map_or(f64::MIN, mean), b.map_or(f64::MIN, mean));
                b.total_cmp(&a)
            });
            mine.truncate(job.n);
        }
        let prompt_text = match job.echo {
            true => state.tokenizer.decode(prompt, false).unwrap_or_default(),
            false => String::new(),
        };
        for generation in mine {
            let generated = generation.and_then(|g| g.text.clone()).unwrap_or_default();
            let logprobs = match job.logprobs {
                false => Value::Null,
                true => {
                    let echoed = scored.as_ref().and_then(|s| s.get(i));
                    let mut entries = Vec::new();
                    for (pos, &tok) in prompt.iter().enumerate().filter(|_| job.echo) {
                        let lp = echoed.and_then(|e| e.get(pos)).and_then(Option::as_ref);
                        entries.push((tok, lp.cloned()));
                    }
                    for lp in generation.map_or(&[][..], |g| g.logprobs.as_slice()) {
                        entries.push((lp.token, Some(lp.clone())));
                    }
                    state.echo_logprobs_json(&entries)
                }
            };
            let finish = generation.map_or("length", |g| finish_reason(g.stop_reason));
            choices.push(json!({
                "index": choices.len(),
                "text": format!("{prompt_text}{generated}"),
                "logprobs": logprobs,
                "finish_reason": finish,
            }));
        }
    }
    Json(json!({
        "id": id,
        "object": "text_completion",
        "created": now_s(),
        "model": state.model_name,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }))
    .into_response()
}

async fn metrics_text(State(state): State<Arc<AppState>>) -> Response {
    let body = state.metrics.render(&state.engine.stats());
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

/// Submits a checked request and answers it, whole or streamed.
async fn respond(state: Arc<AppState>, request: Request, job: Job, id: String) -> Response {
    if let Some(refused) = state.unavailable() {
        return refused;
    }
    let (rx, submitted) = state.submit(request);
    let guard = match submitted {
        Ok(canceller) => {
            state.arm_timeout(&canceller);
            let key = state.next_id.fetch_add(1, Ordering::Relaxed);
            if let Ok(mut active) = state.active.lock() {
                active.insert(key, canceller.clone());
            }
            CancelOnDrop(canceller, Some((state.clone(), key)))
        }
        Err(e) => return engine_error(e).into_response(),
    };
    if job.stream {
        stream_response(state, job, id, rx, guard).into_response()
    } else {
        whole_response(state, job, id, rx, guard).await
    }
}

async fn chat_completions(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    match state.chat_job(&body) {
        Ok((mut requests, job)) => {
            let id = format!("chatcmpl-{}", state.next_id.fetch_add(1, Ordering::Relaxed));
            match requests.pop() {
                Some(request) => respond(state, request, job, id).await,
                None => ApiError::bad("nothing to generate", Some("max_tokens")).into_response(),
            }
        }
        Err(e) => {
            state.metrics.count("invalid");
            e.into_response()
        }
    }
}

async fn whole_response(
    state: Arc<AppState>,
    job: Job,
    id: String,
    mut rx: mpsc::UnboundedReceiver<Event>,
    _guard: CancelOnDrop,
) -> Response {
    while let Some(event) = rx.recv().await {
        match event {
            Event::Finished { generation, .. } if job.chat => {
                let text = generation.text.clone().unwrap_or_default();
                let (reasoning, content) = ReasoningSplitter::split_whole(&text);
                let logprobs = match job.logprobs {
                    true => state.chat_logprobs_json(&generation.logprobs),
                    false => Value::Null,
                };
                let mut message = json!({ "role": "assistant", "content": content });
                if let Some(r) = reasoning {
                    message["reasoning_content"] = Value::String(r);
                }
                let body = json!({
                    "id": id,
                    "object": "chat.completion",
                    "created": now_s(),
                    "model": state.model_name,
                    "choices": [{
                        "index": 0,
                        "message": message,
                        "logprobs": logprobs,
                        "finish_reason": finish_reason(generation.stop_reason),
                    }],
                    "usage": usage(&generation),
                });
                return Json(body).into_response();
            }
            Event::Finished { generation, .. } => {
                let text = generation.text.clone().unwrap_or_default();
                let logprobs = match job.logprobs {
                    true => state.logprobs_json(&generation.logprobs, 0),
                    false => Value::Null,
                };
                let body = json!({
                    "id": id,
                    "object": "text_completion",
                    "created": now_s(),
                    "model": state.model_name,
                    "choices": [{
                        "index": 0,
                        "text": text,
                        "logprobs": logprobs,
                        "finish_reason": finish_reason(generation.stop_reason),
                    }],
                    "usage": usage(&generation),
                });
                return Json(body).into_response();
            }
            Event::Failed(e) => return engine_error(e).into_response(),
            Event::Prefill { .. } | Event::Token(_) => {}
        }
    }
    engine_error(yoco::Error::Engine("the engine stopped".into())).into_response()
}

/// What the event stream still has to do.
struct StreamState {
    state: Arc<AppState>,
    job: Job,
    id: String,
    created: u64,
    rx: mpsc::UnboundedReceiver<Event>,
    /// Bytes of text sent (the logprobs' text offsets).
    sent: usize,
    /// Events still to send before the stream closes.
    closing: Vec<SseEvent>,
    done: bool,
    /// A chat stream's reasoning/answer split (`None` for text completions).
    splitter: Option<ReasoningSplitter>,
    /// Chat events ready to go out before the next engine event, in order.
    ready: std::collections::VecDeque<SseEvent>,
    _guard: CancelOnDrop,
}

impl StreamState {
    fn chunk(&self, text: &str, logprobs: Value, finish: Option<&str>) -> SseEvent {
        SseEvent::default().data(
            json!({
                "id": self.id,
                "object": "text_completion",
                "created": self.created,
                "model": self.state.model_name,
                "choices": [{
                    "index": 0,
                    "text": text,
                    "logprobs": logprobs,
                    "finish_reason": finish,
                }],
            })
            .to_string(),
        )
    }

    /// A `chat.completion.chunk` with `delta` (and `logprobs`, `finish_reason`).
    fn chat_chunk(&self, delta: Value, logprobs: Value, finish: Option<&str>) -> SseEvent {
        SseEvent::default().data(
            json!({
                "id": self.id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.state.model_name,
                "choices": [{
                    "index": 0,
                    "delta": delta,
                    "logprobs": logprobs,
                    "finish_reason": finish,
                }],
            })
            .to_string(),
        )
    }

    /// The deltas of a chat stream's pieces of text: `reasoning_content` or `content`.
    fn chat_deltas(&self, pieces: Vec<ChatPiece>) -> Vec<SseEvent> {
        pieces
            .into_iter()
            .map(|p| {
                let delta = match p {
                    ChatPiece::Reasoning(r) => json!({ "reasoning_content": r }),
                    ChatPiece::Content(c) => json!({ "content": c }),
                };
                self.chat_chunk(delta, Value::Null, None)
            })
            .collect()
    }

    /// The next event to send, or `None` to close the stream.
    async fn next(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(e) = self.ready.pop_front() {
                return Some(e);
            }
            if let Some(e) = self.closing.pop() {
                return Some(e);
            }
            if self.done {
                return None;
            }
            let Some(event) = self.rx.recv().await else {
                self.done = true;
                let error = json!({"error": {"message": "the engine stopped", "type": "server_error", "param": null, "code": null}});
                self.closing = vec![
                    SseEvent::default().data("[DONE]"),
                    SseEvent::default().data(error.to_string()),
                ];
                continue;
            };
            match event {
                // A comment: progress for whoever reads it, and a write that tells the server
                // early when the client has gone.
                Event::Prefill { done, total } => {
                    return Some(SseEvent::default().comment(format!("prefill {done}/{total}")))
                }
                Event::Token(t) if self.job.chat => {
                    let pieces = match self.splitter.as_mut() {
                        Some(split) => split.push(&t.text),
                        None => Vec::new(),
                    };
                    let mut events = self.chat_deltas(pieces);
                    if self.job.logprobs {
                        if let Some(lp) = &t.logprobs {
                            let logprobs = self.state.chat_logprobs_json(std::slice::from_ref(lp));
                            events.push(self.chat_chunk(json!({}), logprobs, None));
                        }
                    }
                    self.ready.extend(events);
                }
                Event::Finished { tail, generation } if self.job.chat => {
                    self.done = true;
                    let mut pieces = match self.splitter.as_mut() {
                        Some(split) => split.push(&tail),
                        None => Vec::new(),
                    };
                    if let Some(split) = self.splitter.as_mut() {
                        pieces.extend(split.finish());
                    }
                    let events = self.chat_deltas(pieces);
                    self.ready.extend(events);
                    let finish = finish_reason(generation.stop_reason);
                    let last = self.chat_chunk(json!({}), Value::Null, Some(finish));
                    self.ready.push_back(last);
                    if self.job.include_usage {
                        let usage_chunk = json!({
                            "id": self.id,
                            "object": "chat.completion.chunk",
                            "created": self.created,
                            "model": self.state.model_name,
                            "choices": [],
                            "usage": usage(&generation),
                        });
                        self.ready
                            .push_back(SseEvent::default().data(usage_chunk.to_string()));
                    }
                    self.ready.push_back(SseEvent::default().data("[DONE]"));
                }
                Event::Token(t) => {
                    if t.text.is_empty() && !self.job.logprobs {
                        continue;
                    }
                    let logprobs = match &t.logprobs {
                        Some(lp) if self.job.logprobs => self
                            .state
                            .logprobs_json(std::slice::from_ref(lp), self.sent),
                        _ => Value::Null,
                    };
                    self.sent += t.text.len();
                    return Some(self.chunk(&t.text, logprobs, None));
                }
                Event::Finished { tail, generation } => {
                    self.done = true;
                    let mut closing = vec![SseEvent::default().data("[DONE]")];
                    if self.job.include_usage {
                        let usage_chunk = json!({
                            "id": self.id,
                            "object": "text_completion",
                            "created": self.created,
                            "model": self.state.model_name,
                            "choices": [],
                            "usage": usage(&generation),
                        });
                        closing.push(SseEvent::default().data(usage_chunk.to_string()));
                    }
                    closing.push(self.chunk(
                        &tail,
                        Value::Null,
                        Some(finish_reason(generation.stop_reason)),
                    ));
                    self.closing = closing;
                }
                Event::Failed(e) => {
                    self.done = true;
                    let error = json!({"error": {"message": e.to_string(), "type": "server_error", "param": null, "code": null}});
                    self.closing = vec![
                        SseEvent::default().data("[DONE]"),
                        SseEvent::default().data(error.to_string()),
                    ];
                }
            }
        }
    }
}

fn stream_response(
    state: Arc<AppState>,
    job: Job,
    id: String,
    rx: mpsc::UnboundedReceiver<Event>,
    guard: CancelOnDrop,
) -> Sse<impl futures_util::Stream<Item = Result<SseEvent, Infallible>>> {
    let mut s = StreamState {
        splitter: job.chat.then(ReasoningSplitter::new),
        state,
        job,
        id,
        created: now_s(),
        rx,
        sent: 0,
        closing: Vec::new(),
        done: false,
        ready: std::collections::VecDeque::new(),
        _guard: guard,
    };
    if s.job.chat {
        // OpenAI's first delta names the role.
        let first = s.chat_chunk(
            json!({ "role": "assistant", "content": "" }),
            Value::Null,
            None,
        );
        s.ready.push_back(first);
    }
    Sse::new(futures_util::stream::unfold(s, |mut s| async move {
        let event = s.next().await?;
        Some((Ok(event), s))
    }))
}
