//! A bounded load test of `examples/serve`: the server runs in this process on 127.0.0.1 (any
//! free port), and N concurrent clients each stream one completion over HTTP; the round ends
//! when every client has its answer, then the next N.
//!
//! ```text
//! cargo run --release --example load -- [--model DIR | --shape bench-160m] [--clients 1,8,32]
//!     [--prompt-tokens 1024-4096] [--new-tokens 128] [--prefill-chunk 512] [--quant q8_0]
//!     [--kv-dtype f16] [--json]
//! ```
//!
//! Prompts are random token ids (a length drawn per client from the range); every request asks
//! for exactly `--new-tokens` tokens (`ignore_eos`) with one streamed event per token. Per round
//! it reports: requests complete in full (all tokens, `[DONE]`, usage agreeing), aggregate
//! tokens/s (generated tokens over the round's wall time), decode tokens/s while every sequence
//! is decoding (from the last first token to the first last token) and from then to the end
//! (the tail, with fewer rows as sequences finish, included), time to first token p50/p95,
//! inter-token latency p50/p95, and the process's peak RSS so far (rounds run in the order
//! given, so list them ascending).
//!
//! `--shape bench-160m` serves random weights of that shape with a word-level tokenizer made up
//! here (one word per id), since only speed matters; without it the model of `--model` (default:
//! the shipped Shakespeare model) with its own tokenizer.

#[path = "serve/app.rs"]
mod app;
mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::{json, Value};
use yoco::{Engine, EngineConfig, Model, Tokenizer};

const DEFAULT_MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/shakespeare");

/// Load test of the HTTP server on loopback: N concurrent streaming clients per round.
#[derive(Parser)]
#[command(name = "load")]
struct Args {
    /// Model directory [default: the shipped models/shakespeare]
    #[arg(long, value_name = "DIR", conflicts_with = "shape")]
    model: Option<PathBuf>,
    /// Random weights of a benchmark shape instead of a model directory: bench-160m or tiny
    #[arg(long, value_name = "SHAPE")]
    shape: Option<String>,
    /// Concurrent clients per round, comma-separated
    #[arg(long, value_name = "N,..", value_delimiter = ',', default_value = "1,8,32",
          value_parser = common::tokens)]
    clients: Vec<usize>,
    /// Prompt length range MIN-MAX (or one length), tokens; `1k-4k` works
    #[arg(long, value_name = "MIN-MAX", default_value = "1k-4k", value_parser = range)]
    prompt_tokens: (usize, usize),
    /// Tokens each request generates
    #[arg(long, value_name = "N", default_value = "128", value_parser = common::tokens)]
    new_tokens: usize,
    /// Prompt tokens prefilled per engine step
    #[arg(long, value_name = "N", default_value_t = yoco::DEFAULT_PREFILL_CHUNK,
          value_parser = common::tokens)]
    prefill_chunk: usize,
    /// Print one JSON object per round instead of the table
    #[arg(long)]
    json: bool,
    /// Quantize the projections as the model loads: q8_0, q4_0 or q4_k (none: float)
    #[arg(long, value_name = "Q", default_value = "none", value_parser = common::quant)]
    quant: common::Quant,
    /// Keep the global K/V in this dtype: f16 or bf16 (half the bytes a decode step's attention
    /// reads) [default: the weights' dtype]
    #[arg(long, value_name = "DTYPE", value_parser = common::dtype)]
    kv_dtype: Option<candle_core::DType>,
}

/// `MIN-MAX` or `N` token counts.
fn range(s: &str) -> Result<(usize, usize), String> {
    let (lo, hi) = match s.split_once('-') {
        Some((lo, hi)) => (common::tokens(lo)?, common::tokens(hi)?),
        None => {
            let n = common::tokens(s)?;
            (n, n)
        }
    };
    if lo > hi {
        return Err(format!("`{s}`: the minimum is above the maximum"));
    }
    Ok((lo, hi))
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("error: some requests did not complete in full");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A tokenizer with one word per id (`t0`, `t1`, ...), for models without one.
fn word_tokenizer(vocab: usize) -> Result<Tokenizer, Box<dyn std::error::Error>> {
    let words: HashMap<String, u32> = (0..vocab as u32).map(|i| (format!("t{i}"), i)).collect();
    let model = tokenizers::models::wordlevel::WordLevel::builder()
        .vocab(words.into_iter().collect())
        .unk_token("t0".into())
        .build()
        .map_err(|e| e.to_string())?;
    Ok(Tokenizer::from_tokenizers(tokenizers::Tokenizer::new(
        model,
    )))
}

/// What one client saw.
struct ClientResult {
    prompt_tokens: usize,
    sent: Instant,
    /// Arrival time of each token's event.
    tokens: Vec<Instant>,
    complete: bool,
    error: Option<String>,
}

/// One streaming request, read event by event.
fn client(base: &str, prompt: Vec<u32>, new_tokens: usize, seed: u64) -> ClientResult {
    let prompt_tokens = prompt.len();
    let sent = Instant::now();
    let mut out = ClientResult {
        prompt_tokens,
        sent,
        tokens: Vec::with_capacity(new_tokens),
        complete: false,
        error: None,
    };
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(3600)))
        .build()
        .into();
    let body = json!({
        "prompt": prompt,
        "max_tokens": new_tokens,
        "ignore_eos": true,
        "temperature": 0.8,
        "seed": seed,
        "stream": true,
        "stream_options": {"include_usage": true},
        // One event per token, whatever text it releases.
        "logprobs": 0,
    });
    let resp = match agent
        .post(format!("{base}/v1/completions"))
        .header("content-type", "application/json")
        .send(body.to_string())
    {
        Ok(r) => r,
        Err(e) => {
            out.error = Some(e.to_string());
            return out;
        }
    };
    if resp.status() != 200 {
        out.error = Some(format!("status {}", resp.status()));
        return out;
    }
    let mut done = false;
    let mut finish = None;
    let mut usage = None;
    for line in BufReader::new(resp.into_body().into_reader()).lines() {
        let Ok(line) = line else { break };
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            done = true;
            break;
        }
        let Ok(chunk) = serde_json::from_str::<Value>(data) else {
            out.error = Some(format!("not JSON: {data}"));
            break;
        };
        if let Some(u) = chunk.get("usage") {
            usage = u["completion_tokens"].as_u64();
        }
        if let Some(choice) = chunk["choices"].get(0) {
            if let Some(r) = choice["finish_reason"].as_str() {
                finish = Some(r.to_string());
            } else if !choice["logprobs"].is_null() {
                out.tokens.push(Instant::now());
            }
        }
    }
    out.complete = done
        && finish.as_deref() == Some("length")
        && out.tokens.len() == new_tokens
        && usage == Some(new_tokens as u64);
    out
}

/// Nearest-rank percentile of seconds, in milliseconds.
fn percentile_ms(xs: &mut [f64], p: f64) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * xs.len() as f64).ceil().max(1.0) as usize;
    xs[rank.min(xs.len()) - 1] * 1e3
}

fn run(args: Args) -> Result<bool, Box<dyn std::error::Error>> {
    let (model, tokenizer, name) = match &args.shape {
        Some(shape) => {
            let s = match shape.as_str() {
                "bench-160m" => common::BENCH_160M,
                "tiny" => common::TINY,
                other => return Err(format!("unknown shape `{other}` (bench-160m, tiny)").into()),
            };
            let options = yoco::LoadOptions {
                quant: args.quant.0,
                kv_dtype: args.kv_dtype,
                ..yoco::LoadOptions::default()
            };
            let model = Model::random_with(&s.yoco(None), &options)?;
            (model, word_tokenizer(s.vocab)?, s.name.to_string())
        }
        None => {
            let dir = args
                .model
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_MODEL));
            let options = yoco::LoadOptions {
                quant: args.quant.0,
                kv_dtype: args.kv_dtype,
                ..yoco::LoadOptions::default()
            };
            let model = Model::load_with(&dir, &options)?;
            let name = dir
                .file_name()
                .map_or("model".into(), |n| n.to_string_lossy().into_owned());
            (model, Tokenizer::from_model_dir(&dir)?, name)
        }
    };
    let vocab = model.config().vocab_size();
    let most = args.clients.iter().copied().max().unwrap_or(1);
    let engine = Engine::new(
        Arc::new(model),
        Some(Arc::new(tokenizer.clone())),
        EngineConfig {
            max_sequences: most,
            max_queue: most,
            ..EngineConfig::default()
        },
    )?;
    let state = Arc::new(app::AppState::new(
        engine,
        Arc::new(tokenizer),
        name.clone(),
        args.prompt_tokens.1,
        args.new_tokens,
        args.prefill_chunk,
    ));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let base = format!("http://{}", listener.local_addr()?);
    runtime.spawn(app::serve(listener, state));

    if !args.json {
        println!(
            "{name}, prompts {}-{} tokens, {} new tokens each, prefill chunk {}",
            args.prompt_tokens.0, args.prompt_tokens.1, args.new_tokens, args.prefill_chunk
        );
        println!();
        println!("| clients | complete | aggregate tok/s | decode tok/s (all decoding) | to the end | TTFT p50 | TTFT p95 | ITL p50 | ITL p95 | peak RSS |");
        println!("|---|---|---|---|---|---|---|---|---|---|");
    }
    let mut all_complete = true;
    for (round, &n) in args.clients.iter().enumerate() {
        let t0 = Instant::now();
        let threads: Vec<_> = (0..n)
            .map(|c| {
                let seed = (round * 1000 + c) as u64;
                let (lo, hi) = args.prompt_tokens;
                let len = lo + (yoco::Rng::new(seed).next_u64() % (hi - lo + 1) as u64) as usize;
                let prompt = common::random_ids(len, vocab, seed + 7);
                let base = base.clone();
                let new_tokens = args.new_tokens;
                std::thread::spawn(move || client(&base, prompt, new_tokens, seed))
            })
            .collect();
        let results: Vec<ClientResult> = threads
            .into_iter()
            .map(|t| t.join().map_err(|_| "a client thread panicked"))
            .collect::<Result<_, _>>()?;
        let wall = t0.elapsed().as_secs_f64();
        let complete = results.iter().filter(|r| r.complete).count();
        all_complete &= complete == n;
        for r in results.iter().filter(|r| r.error.is_some()) {
            eprintln!("client error: {}", r.error.as_deref().unwrap_or(""));
        }
        let generated: usize = results.iter().map(|r| r.tokens.len()).sum();
        let mut ttft: Vec<f64> = results
            .iter()
            .filter_map(|r| Some(r.tokens.first()?.duration_since(r.sent).as_secs_f64()))
            .collect();
        let mut itl: Vec<f64> = results
            .iter()
            .flat_map(|r| {
                r.tokens
                    .windows(2)
                    .map(|w| w[1].duration_since(w[0]).as_secs_f64())
            })
            .collect();
        // Decode throughput while every sequence decodes: from the last first token (nothing
        // left to prefill) to the first last token (nobody finished yet). Counting on to the
        // very last token would mix in the tail, where the sequences that started first have
        // finished and fewer rows share each step; that rate is reported too, as `to the end`.
        let all_started = results
            .iter()
            .filter_map(|r| r.tokens.first())
            .max()
            .copied();
        let first_done = results
            .iter()
            .filter_map(|r| r.tokens.last())
            .min()
            .copied();
        let last = results
            .iter()
            .filter_map(|r| r.tokens.last())
            .max()
            .copied();
        let rate_until = |end: Option<Instant>| match (all_started, end) {
            (Some(a), Some(b)) if b > a => {
                let within: usize = results
                    .iter()
                    .map(|r| r.tokens.iter().filter(|&&t| t > a && t <= b).count())
                    .sum();
                within as f64 / b.duration_since(a).as_secs_f64()
            }
            _ => f64::NAN,
        };
        let decode_rate = rate_until(first_done);
        let to_end_rate = rate_until(last);
        let prompt_total: usize = results.iter().map(|r| r.prompt_tokens).sum();
        let peak = common::peak_rss_bytes() as f64 / 1e6;
        let (t50, t95) = (
            percentile_ms(&mut ttft, 50.0),
            percentile_ms(&mut ttft, 95.0),
        );
        let (i50, i95) = (percentile_ms(&mut itl, 50.0), percentile_ms(&mut itl, 95.0));
        let aggregate = generated as f64 / wall;
        if args.json {
            println!(
                "{}",
                json!({
                    "model": name, "clients": n, "complete": complete, "prompt_tokens": prompt_total,
                    "generated": generated, "wall_s": wall, "aggregate_tok_s": aggregate,
                    "decode_tok_s": decode_rate, "decode_to_end_tok_s": to_end_rate, "ttft_ms": [t50, t95], "itl_ms": [i50, i95],
                    "peak_rss_mb": peak,
                })
            );
        } else {
            println!(
                "| {n} | {complete}/{n} | {aggregate:.1} | {decode_rate:.1} | {to_end_rate:.1} | {t50:.0} ms | {t95:.0} ms | {i50:.1} ms | {i95:.1} ms | {peak:.0} MB |"
            );
        }
    }
    Ok(all_complete)
}
