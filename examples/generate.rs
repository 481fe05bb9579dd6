//! Generate text with a YOCO model: yoco's main command.
//!
//! ```text
//! cargo run --release --example generate -- [--model DIR] [--prompt TEXT | --prompt-tokens 1,2,3]
//!     [--max-new-tokens N] [--greedy] [--temperature T] [--top-k K] [--top-p P] [--min-p P]
//!     [--repeat-penalty R] [--seed S] [--device cpu|cuda|cuda:N] [--dtype f32|bf16|f16]
//!     [--quant q8_0|q4_0|q4_k] [--prefill-chunk N] [--json]
//! ```
//!
//! Without `--model` it runs the small Shakespeare model that ships with the crate. Text streams
//! to stdout; the last line gives prompt and generation speed. `--json` prints one JSON object
//! instead. A prompt of token ids (`--prompt-tokens`) needs no tokenizer. `--help` gives every
//! flag with its default; a bad command line is an error with exit status 2.

mod common;

use std::io::Write;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::process::ExitCode;

use candle_core::{DType, Device};
use clap::Parser;
use yoco::{GenerationConfig, Model, Sampling, Tokenizer};

/// The model that ships with the crate, and a prompt in its format (speaker name, then a line).
const DEFAULT_MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/shakespeare");
const DEFAULT_PROMPT: &str = "ROMEO.\n";

/// Generates text with a YOCO model, streamed to stdout, then one line of prompt and generation
/// speed. Without --model: the small Shakespeare model that ships with yoco.
#[derive(Parser)]
#[command(name = "generate")]
struct Args {
    /// Model directory (params.json, weights, tokenizer.json) [default: the shipped
    /// models/shakespeare]
    #[arg(long, value_name = "DIR")]
    model: Option<PathBuf>,
    /// Prompt text, encoded with the model's tokenizer [default: "ROMEO.\n"]
    #[arg(long, value_name = "TEXT")]
    prompt: Option<String>,
    /// Prompt as token ids, comma-separated (needs no tokenizer; without one the output is ids)
    #[arg(long, value_name = "1,2,3", conflicts_with = "prompt", value_delimiter = ',',
          value_parser = token_id)]
    prompt_tokens: Option<Vec<u32>>,
    /// Most tokens to generate
    #[arg(long, value_name = "N", default_value_t = 200)]
    max_new_tokens: usize,
    /// Greedy decoding: always the most likely token (temperature 0, no penalty)
    #[arg(long, conflicts_with_all = ["temperature", "top_k", "top_p", "min_p", "repeat_penalty"])]
    greedy: bool,
    /// Sampling temperature (0 = greedy)
    #[arg(long, value_name = "T", default_value_t = Sampling::default().temperature)]
    temperature: f32,
    /// Sample from the K most likely tokens only [default: off]
    #[arg(long, value_name = "K")]
    top_k: Option<usize>,
    /// Nucleus sampling: the fewest most likely tokens whose probability reaches P (1 = off)
    #[arg(long, value_name = "P", default_value_t = Sampling::default().top_p.unwrap_or(1.0))]
    top_p: f32,
    /// Drop tokens less likely than P times the most likely one [default: off]
    #[arg(long, value_name = "P")]
    min_p: Option<f32>,
    /// Repetition penalty on recent tokens (1 = none)
    #[arg(long, value_name = "R", default_value_t = Sampling::default().repetition_penalty)]
    repeat_penalty: f32,
    /// Seed of the sampler (same seed, same text)
    #[arg(long, value_name = "S", default_value_t = GenerationConfig::default().seed)]
    seed: u64,
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
    /// Quantize the projections as the model loads: q8_0, q4_0 or q4_k (none: as stored)
    #[arg(long, value_name = "Q", default_value = "none", value_parser = common::quant)]
    quant: common::Quant,
    /// Prompt tokens per prefill step (bounds working memory)
    #[arg(long, value_name = "N", default_value_t = GenerationConfig::default().prefill_chunk)]
    prefill_chunk: usize,
    /// Print one JSON object (tokens, text, speeds) instead of streaming text
    #[arg(long)]
    json: bool,
}

/// One id of `--prompt-tokens` (spaces around it allowed).
fn token_id(s: &str) -> Result<u32, String> {
    s.trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a token id"))
}

impl Args {
    fn generation_config(&self) -> GenerationConfig {
        let sampling = if self.greedy {
            Sampling::greedy()
        } else {
            Sampling {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: Some(self.top_p),
                min_p: self.min_p,
                repetition_penalty: self.repeat_penalty,
                ..Sampling::default()
            }
        };
        GenerationConfig {
            max_new_tokens: self.max_new_tokens,
            sampling,
            seed: self.seed,
            prefill_chunk: self.prefill_chunk,
            ..GenerationConfig::default()
        }
    }
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let model_dir = args
        .model
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_MODEL));
    let t0 = std::time::Instant::now();
    let options = yoco::LoadOptions {
        device: args.device.clone(),
        dtype: args.dtype,
        quant: args.quant.0,
        kv_dtype: args.kv_dtype,
        ..yoco::LoadOptions::default()
    };
    let model = Model::load_with(&model_dir, &options)?;
    let load_s = t0.elapsed().as_secs_f64();
    // A token prompt needs no tokenizer; text does (and the output is then decoded too).
    let tokenizer = match Tokenizer::from_model_dir(&model_dir) {
        Ok(t) => Some(t),
        Err(e) if args.prompt_tokens.is_none() => return Err(e.into()),
        Err(_) => None,
    };
    let mut cfg = args.generation_config();
    if let Some(tok) = &tokenizer {
        cfg = cfg.for_tokenizer(tok);
    }
    cfg = cfg.for_model(&model);
    let prompt_ids = match (&args.prompt_tokens, &tokenizer) {
        (Some(ids), _) => ids.clone(),
        (None, Some(tok)) => tok.encode(args.prompt.as_deref().unwrap_or(DEFAULT_PROMPT), true)?,
        (None, None) => return Err("no prompt".into()),
    };

    let mut stdout = std::io::stdout().lock();
    let mut stream = tokenizer.as_ref().map(|t| t.stream(true));
    if !args.json {
        if let (Some(tok), None) = (&tokenizer, &args.prompt_tokens) {
            write!(stdout, "{}", tok.decode(&prompt_ids, true)?)?;
        }
    }
    let mut write_error = None;
    let out = model.generate_stream(&prompt_ids, &cfg, |id| {
        if args.json {
            return ControlFlow::Continue(());
        }
        let piece = match stream.as_mut() {
            Some(s) => s.step(id).ok().flatten(),
            None => Some(format!("{id} ")),
        };
        if let Some(p) = piece {
            if let Err(e) = write!(stdout, "{p}").and_then(|_| stdout.flush()) {
                write_error = Some(e);
                return ControlFlow::Break(());
            }
        }
        ControlFlow::Continue(())
    })?;
    if let Some(e) = write_error {
        return Err(e.into());
    }
    if args.json {
        let text = match &tokenizer {
            Some(t) => t.decode(&out.tokens, true)?,
            None => String::new(),
        };
        let json = serde_json::json!({
            "prompt_tokens": prompt_ids,
            "tokens": out.tokens,
            "text": text,
            "stop_reason": format!("{:?}", out.stop_reason),
            "prefill_ms": out.prefill_time.as_secs_f64() * 1e3,
            "prompt_tokens_per_s": out.prefill_tokens_per_s(),
            "decode_tokens_per_s": out.decode_tokens_per_s(),
            "load_s": load_s,
            "quant": common::quant_name(args.quant.0),
            "weight_bytes": model.weight_bytes(),
        });
        writeln!(stdout, "{json}")?;
    } else {
        if let Some(rest) = stream.as_mut().and_then(|s| s.finish().ok().flatten()) {
            write!(stdout, "{rest}")?;
        }
        writeln!(stdout)?;
        writeln!(
            stdout,
            "\n[{} prompt tokens at {:.1} tokens/s, {} generated at {:.1} tokens/s; stopped: {:?}; model loaded in {:.2} s]",
            out.prompt_tokens,
            out.prefill_tokens_per_s(),
            out.tokens.len(),
            out.decode_tokens_per_s(),
            out.stop_reason,
            load_s
        )?;
    }
    Ok(())
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
