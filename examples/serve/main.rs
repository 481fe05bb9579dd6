//! An OpenAI-compatible completions and chat completions server over yoco's continuous-batching
//! engine.
//!
//! ```text
//! cargo run --release --example serve -- [--model DIR] [--host 127.0.0.1] [--port 8080]
//!     [--max-sequences 16] [--max-queue 64] [--max-prompt-tokens N] [--max-tokens N]
//!     [--prefill-chunk N] [--prefix-cache-mb MB] [--device cpu|cuda:N] [--dtype f32|bf16|f16]
//!     [--quant none|q8_0|q4_0|q4_k] [--shutdown-grace-s 30] [--request-timeout-s S]
//! ```
//!
//! SIGTERM or Ctrl-C shuts it down gracefully: no new connections (requests on open ones get a
//! 503), the running requests finish (streams with their finish reason and `[DONE]`), those still
//! running after `--shutdown-grace-s` are cancelled (finish reason `abort`), and the process exits
//! with status 0.
//!
//! Without `--model` it serves the small Shakespeare model that ships with the crate. Endpoints:
//! `POST /v1/completions` and `POST /v1/chat/completions` (streamed with `"stream": true`),
//! `GET /v1/models`, `GET /health`; see
//! `app.rs` and README.md ("Serving") for the fields and curl commands.

mod app;
#[path = "../common/mod.rs"]
mod common;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use candle_core::{DType, Device};
use clap::Parser;
use yoco::{Engine, EngineConfig, LoadOptions, Model, Tokenizer};

const DEFAULT_MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/shakespeare");

/// Serves a YOCO model over HTTP with OpenAI's completions API: every running sequence decodes
/// in one batch, new ones join between steps, long prompts are prefilled in chunks between
/// steps, and prompts that start like an earlier one start from its state.
#[derive(Parser)]
#[command(name = "serve")]
struct Args {
    /// Model directory (params.json, weights, tokenizer.json) [default: the shipped
    /// models/shakespeare]
    #[arg(long, value_name = "DIR")]
    model: Option<PathBuf>,
    /// Address to listen on (127.0.0.1: this machine only)
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0: any free port, printed at start)
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Sequences running at once (the decode batch is at most this large)
    #[arg(long, value_name = "N", default_value_t = EngineConfig::default().max_sequences,
          value_parser = common::tokens)]
    max_sequences: usize,
    /// Requests waiting for a place; more get 429
    #[arg(long, value_name = "N", default_value_t = EngineConfig::default().max_queue,
          value_parser = common::tokens)]
    max_queue: usize,
    /// Longest prompt accepted, in tokens (`4k` works)
    #[arg(long, value_name = "N", default_value = "64k", value_parser = common::tokens)]
    max_prompt_tokens: usize,
    /// Largest max_tokens accepted
    #[arg(long, value_name = "N", default_value = "4096", value_parser = common::tokens)]
    max_tokens: usize,
    /// Prompt tokens prefilled per engine step: the running sequences wait this long per token
    /// while a prompt comes in (smaller: smoother streams, slower prompts)
    #[arg(long, value_name = "N", default_value_t = yoco::DEFAULT_PREFILL_CHUNK,
          value_parser = common::tokens)]
    prefill_chunk: usize,
    /// Memory for kept prompt states (prefix reuse), in MB; 0 turns it off
    #[arg(long, value_name = "MB", default_value_t = EngineConfig::default().prefix_cache_bytes >> 20)]
    prefix_cache_mb: usize,
    /// cpu, cuda or cuda:N (CUDA needs a build with `--features cuda`)
    #[arg(long, value_name = "DEVICE", default_value = "cpu", value_parser = common::device)]
    device: Device,
    /// Weight dtype: f32, bf16 or f16
    #[arg(long, value_name = "DTYPE", default_value = "f32", value_parser = common::dtype)]
    dtype: DType,
    /// Keep the global K/V cache in this dtype (f16 or bf16 halve what long-context decoding
    /// reads) [default: the weights' dtype]
    #[arg(long, value_name = "DTYPE", value_parser = common::dtype)]
    kv_dtype: Option<DType>,
    /// Quantize the projections as they load: none, q8_0, q4_0, q4_k
    #[arg(long, value_name = "Q", default_value = "none", value_parser = common::quant)]
    quant: common::Quant,
    /// On SIGTERM or Ctrl-C: seconds the requests being answered may take to finish before they
    /// are cancelled (no new request is taken meanwhile); then the server exits with status 0
    #[arg(long, value_name = "S", default_value_t = 30.0)]
    shutdown_grace_s: f64,
    /// Cancel a request still running after this many seconds (finish reason `abort`)
    /// [default: no limit]
    #[arg(long, value_name = "S")]
    request_timeout_s: Option<f64>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let dir = args.model.unwrap_or_else(|| PathBuf::from(DEFAULT_MODEL));
    let options = LoadOptions {
        device: args.device,
        dtype: args.dtype,
        quant: args.quant.0,
        kv_dtype: args.kv_dtype,
        ..LoadOptions::default()
    };
    let model = Arc::new(Model::load_with(&dir, &options)?);
    let tokenizer = Arc::new(Tokenizer::from_model_dir(&dir)?);
    let name = dir
        .file_name()
        .map_or_else(|| "yoco".to_string(), |n| n.to_string_lossy().into_owned());
    let engine = Engine::new(
        model,
        Some(tokenizer.clone()),
        EngineConfig {
            max_sequences: args.max_sequences,
            max_queue: args.max_queue,
            prefix_cache_bytes: args.prefix_cache_mb << 20,
        },
    )?;
    let state = Arc::new(app::AppState::new(
        engine,
        tokenizer,
        name.clone(),
        args.max_prompt_tokens,
        args.max_tokens,
        args.prefill_chunk,
    ));
    if let Some(t) = args.request_timeout_s {
        if !(t.is_finite() && t > 0.0) {
            return Err(format!(
                "--request-timeout-s must be a positive number of seconds, got {t}"
            )
            .into());
        }
        state.set_request_timeout(Some(std::time::Duration::from_secs_f64(t)));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port)).await?;
        eprintln!(
            "serving `{name}` on http://{} (POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health)",
            listener.local_addr()?
        );
        let grace = std::time::Duration::from_secs_f64(args.shutdown_grace_s.max(0.0));
        app::serve_until(listener, state, shutdown_signal(), grace).await?;
        eprintln!("shut down");
        Ok::<(), std::io::Error>(())
    })?;
    Ok(())
}

/// Completes at the first SIGTERM (what a process manager or a rolling restart sends) or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate => {}
    }
    eprintln!("shutting down: no new requests; waiting for the running ones");
}
