//! Chat with a model in the terminal.
//!
//! ```text
//! cargo run --release --example chat -- [--model DIR] [--system TEXT] [--hide-reasoning]
//!     [--max-tokens N] [--temperature T] [--top-p P] [--seed S] [--quant q8_0|q4_0|q4_k]
//!     [--device cpu|cuda|cuda:N] [--dtype f32|bf16|f16]
//! ```
//!
//! Each line you type is a user turn; the answer streams back, then one line of speed. The
//! conversation's cache is kept between turns, so a turn prefills only its new tokens (the
//! conversation is rendered again by the chat template, and whatever it shares with what the
//! cache already holds is not computed again). A reasoning model's `<think>…</think>` is shown
//! dimmed, or not at all with `--hide-reasoning`. Sampling defaults come from the directory's
//! `generation_config.json` when it has them. Ctrl-C ends the answer being written; an empty
//! line or Ctrl-D ends the chat.
//!
//! A directory with a chat template (`tokenizer_config.json`), or a Phi-4-mini-flash directory
//! (built-in Phi-4 format), chats; a model without one, such as the shipped Shakespeare model
//! (the default), continues the conversation's text as it is.

mod common;

use std::io::{BufRead, Write};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle_core::{DType, Device};
use clap::Parser;
use yoco::{
    ChatMessage, ChatPiece, GenerationConfig, Model, ModelConfig, ReasoningSplitter, Sampling,
    Tokenizer,
};

const DEFAULT_MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/shakespeare");

/// Chat with a model in the terminal: each line a user turn, the answer streamed back with its
/// speed. Ctrl-C ends an answer; an empty line or Ctrl-D ends the chat.
#[derive(Parser)]
#[command(name = "chat")]
struct Args {
    /// Model directory [default: the shipped models/shakespeare]
    #[arg(long, value_name = "DIR")]
    model: Option<PathBuf>,
    /// A system message opening the conversation
    #[arg(long, value_name = "TEXT")]
    system: Option<String>,
    /// Do not show the reasoning (`<think>…</think>`) at all
    #[arg(long)]
    hide_reasoning: bool,
    /// Most tokens per answer
    #[arg(long, value_name = "N", default_value_t = 1024)]
    max_tokens: usize,
    /// Sampling temperature [default: generation_config.json's, else 0.6 for a chat model and
    /// yoco's default otherwise]
    #[arg(long, value_name = "T")]
    temperature: Option<f32>,
    /// Nucleus sampling [default: generation_config.json's, else 0.95]
    #[arg(long, value_name = "P")]
    top_p: Option<f32>,
    /// Seed of the sampler
    #[arg(long, value_name = "S", default_value_t = GenerationConfig::default().seed)]
    seed: u64,
    /// Quantize the projections as they load: none, q8_0, q4_0, q4_k
    #[arg(long, value_name = "Q", default_value = "none", value_parser = common::quant)]
    quant: common::Quant,
    /// cpu, cuda or cuda:N
    #[arg(long, value_name = "DEVICE", default_value = "cpu", value_parser = common::device)]
    device: Device,
    /// Weight dtype: f32, bf16 or f16
    #[arg(long, value_name = "DTYPE", default_value = "f32", value_parser = common::dtype)]
    dtype: DType,
    /// Keep the global K/V cache in this dtype (f16 or bf16 halve what long-context decoding
    /// reads) [default: the weights' dtype]
    #[arg(long, value_name = "DTYPE", value_parser = common::dtype)]
    kv_dtype: Option<DType>,
}

/// `temperature` and `top_p` of a `generation_config.json`, where given.
fn generation_defaults(dir: &Path) -> (Option<f32>, Option<f32>) {
    let Ok(text) = std::fs::read_to_string(dir.join("generation_config.json")) else {
        return (None, None);
    };
    let Ok(json) = serde_json::from_str::<serde_json::Value>(&text) else {
        return (None, None);
    };
    let get = |k: &str| json.get(k).and_then(|v| v.as_f64()).map(|v| v as f32);
    (get("temperature"), get("top_p"))
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let dir = args
        .model
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_MODEL));
    let options = yoco::LoadOptions {
        device: args.device.clone(),
        dtype: args.dtype,
        quant: args.quant.0,
        kv_dtype: args.kv_dtype,
        ..yoco::LoadOptions::default()
    };
    let model = Model::load_with(&dir, &options)?;
    let tokenizer = Tokenizer::from_model_dir(&dir)?;
    // Chat through a template, or continue plain text.
    let chats =
        tokenizer.chat_template()?.is_some() || matches!(model.config(), ModelConfig::Phi4Flash(_));
    let (file_temperature, file_top_p) = generation_defaults(&dir);
    let chat_default = |v: f32| chats.then_some(v);
    let temperature = args
        .temperature
        .or(file_temperature)
        .or(chat_default(0.6))
        .unwrap_or(Sampling::default().temperature);
    let top_p = args
        .top_p
        .or(file_top_p)
        .or(chat_default(0.95))
        .or(Sampling::default().top_p)
        .unwrap_or(1.0);
    let cfg = GenerationConfig {
        max_new_tokens: args.max_tokens,
        sampling: Sampling {
            temperature,
            top_p: (top_p < 1.0).then_some(top_p),
            ..Sampling::default()
        },
        seed: args.seed,
        ..GenerationConfig::default()
    }
    .for_tokenizer(&tokenizer)
    .for_model(&model);
    cfg.validate()?;

    // Ctrl-C ends the answer being written (not the program).
    let interrupted = Arc::new(AtomicBool::new(false));
    let flag = interrupted.clone();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::spawn(move || {
        runtime.block_on(async move {
            while tokio::signal::ctrl_c().await.is_ok() {
                flag.store(true, Ordering::SeqCst);
            }
        })
    });

    let mut messages: Vec<ChatMessage> = Vec::new();
    if let Some(system) = &args.system {
        messages.push(ChatMessage::new("system", system.as_str()));
    }
    let mut cache = model.new_cache(1)?;
    // The ids the cache has consumed, in order.
    let mut in_cache: Vec<u32> = Vec::new();
    let mut stdout = std::io::stdout().lock();
    let mut lines = std::io::stdin().lock().lines();
    let mut turn = 0u64;
    loop {
        write!(stdout, "> ")?;
        stdout.flush()?;
        let Some(line) = lines.next().transpose()? else {
            break;
        };
        let line = line.trim_end().to_string();
        if line.is_empty() {
            break;
        }
        messages.push(ChatMessage::new("user", line));
        let full = if chats {
            tokenizer.apply_chat_template(&messages, true)?
        } else {
            let text: Vec<&str> = messages.iter().map(|m| m.content.as_str()).collect();
            tokenizer.encode(&format!("{}\n", text.join("\n")), true)?
        };
        // Only what the cache does not hold yet is prefilled; a conversation that renders
        // differently from what the cache holds starts over.
        let shared = full
            .iter()
            .zip(&in_cache)
            .take_while(|(a, b)| a == b)
            .count();
        if shared < in_cache.len() || shared == full.len() {
            cache.reset()?;
            in_cache.clear();
        }
        let new = &full[in_cache.len()..];
        let turn_cfg = GenerationConfig {
            seed: args.seed.wrapping_add(turn),
            ..cfg.clone()
        };
        turn += 1;
        interrupted.store(false, Ordering::SeqCst);
        let mut text = tokenizer.stream(true);
        let mut split = ReasoningSplitter::new();
        let mut answer = String::new();
        let mut write_error = None;
        let mut show = |pieces: Vec<ChatPiece>, out: &mut std::io::StdoutLock| {
            for piece in pieces {
                let shown = match piece {
                    ChatPiece::Reasoning(_) if args.hide_reasoning => Ok(()),
                    ChatPiece::Reasoning(r) => write!(out, "\x1b[2m{r}\x1b[0m"),
                    ChatPiece::Content(c) => write!(out, "{c}"),
                };
                if let Err(e) = shown.and_then(|_| out.flush()) {
                    write_error = Some(e);
                }
            }
        };
        let out = model.generate_from(&mut cache, new, &turn_cfg, |id| {
            if let Ok(Some(piece)) = text.step(id) {
                answer.push_str(&piece);
                let pieces = if chats {
                    split.push(&piece)
                } else {
                    vec![ChatPiece::Content(piece)]
                };
                show(pieces, &mut stdout);
            }
            if interrupted.load(Ordering::SeqCst) {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })?;
        if let Some(rest) = text.finish().ok().flatten() {
            answer.push_str(&rest);
            let pieces = if chats {
                split.push(&rest)
            } else {
                vec![ChatPiece::Content(rest)]
            };
            show(pieces, &mut stdout);
        }
        show(split.finish(), &mut stdout);
        if let Some(e) = write_error {
            return Err(e.into());
        }
        // What the cache now holds: the prompt and the answer's tokens it was fed.
        in_cache.extend_from_slice(new);
        in_cache.extend(&out.tokens);
        in_cache.truncate(cache.positions()[0]);
        writeln!(
            stdout,
            "\n[{} new prompt tokens ({} reused) at {:.1} tokens/s, {} tokens at {:.1} tokens/s{}]",
            new.len(),
            full.len() - new.len(),
            out.prefill_tokens_per_s(),
            out.tokens.len(),
            out.decode_tokens_per_s(),
            if interrupted.load(Ordering::SeqCst) {
                "; interrupted"
            } else {
                ""
            }
        )?;
        // The answer as written, reasoning included: the next turn's rendering then begins with
        // what the cache holds.
        messages.push(ChatMessage::new("assistant", answer));
    }
    Ok(())
}
