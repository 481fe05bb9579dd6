//! Generate text with a YOCO model: yoco's main command.
//!
//! ```text
//! cargo run --release --example generate -- [--model DIR] [--prompt TEXT | --prompt-tokens 1,2,3]
//!     [--max-new-tokens N] [--greedy] [--temperature T] [--top-k K] [--top-p P] [--min-p P]
//!     [--repeat-penalty R] [--seed S] [--device cpu|cuda] [--dtype f32|bf16|f16]
//!     [--prefill-chunk N] [--json]
//! ```
//!
//! Without `--model` it runs the small Shakespeare model that ships with the crate. Text streams
//! to stdout; the last line gives prompt and generation speed. `--json` prints one JSON object
//! instead. A prompt of token ids (`--prompt-tokens`) needs no tokenizer.

use std::io::Write;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::process::ExitCode;

use yoco::{GenerationConfig, Model, Sampling, Tokenizer};

const USAGE: &str = "usage: generate [--model DIR] [--prompt TEXT | --prompt-tokens 1,2,3] [--max-new-tokens N]
                [--greedy] [--temperature T] [--top-k K] [--top-p P] [--min-p P] [--repeat-penalty R]
                [--seed S] [--device cpu|cuda] [--dtype f32|bf16|f16] [--prefill-chunk N] [--json]";

/// The model that ships with the crate, and a prompt in its format (speaker name, then a line).
const DEFAULT_MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/shakespeare");
const DEFAULT_PROMPT: &str = "ROMEO.\n";

struct Args {
    model: PathBuf,
    prompt: Option<String>,
    prompt_tokens: Option<Vec<u32>>,
    cfg: GenerationConfig,
    device: String,
    dtype: String,
    json: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        model: PathBuf::from(DEFAULT_MODEL),
        prompt: None,
        prompt_tokens: None,
        cfg: GenerationConfig {
            max_new_tokens: 200,
            ..GenerationConfig::default()
        },
        device: "cpu".into(),
        dtype: "f32".into(),
        json: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        fn num<T: std::str::FromStr>(flag: &str, v: String) -> Result<T, String> {
            v.parse()
                .map_err(|_| format!("{flag}: `{v}` is not a valid number"))
        }
        let s = &mut args.cfg.sampling;
        match flag.as_str() {
            "--model" => args.model = PathBuf::from(value()?),
            "--prompt" => args.prompt = Some(value()?),
            "--prompt-tokens" => {
                let v = value()?;
                let ids = v
                    .split(',')
                    .map(|t| {
                        t.trim()
                            .parse::<u32>()
                            .map_err(|_| format!("--prompt-tokens: `{t}` is not a token id"))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                args.prompt_tokens = Some(ids);
            }
            "--max-new-tokens" => args.cfg.max_new_tokens = num(&flag, value()?)?,
            "--greedy" => *s = Sampling::greedy(),
            "--temperature" => s.temperature = num(&flag, value()?)?,
            "--top-k" => s.top_k = Some(num(&flag, value()?)?),
            "--top-p" => s.top_p = Some(num(&flag, value()?)?),
            "--min-p" => s.min_p = Some(num(&flag, value()?)?),
            "--repeat-penalty" => s.repetition_penalty = num(&flag, value()?)?,
            "--seed" => args.cfg.seed = num(&flag, value()?)?,
            "--device" => args.device = value()?,
            "--dtype" => args.dtype = value()?,
            "--prefill-chunk" => args.cfg.prefill_chunk = num(&flag, value()?)?,
            "--json" => args.json = true,
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument `{other}`\n{USAGE}")),
        }
    }
    if args.prompt.is_some() && args.prompt_tokens.is_some() {
        return Err("give --prompt or --prompt-tokens, not both".into());
    }
    Ok(args)
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let device = yoco::device_by_name(&args.device)?;
    let dtype = yoco::dtype_by_name(&args.dtype)?;
    let t0 = std::time::Instant::now();
    let model = Model::load(&args.model, &device, dtype)?;
    let load_s = t0.elapsed().as_secs_f64();
    // A token prompt needs no tokenizer; text does (and the output is then decoded too).
    let tokenizer = match Tokenizer::from_model_dir(&args.model) {
        Ok(t) => Some(t),
        Err(e) if args.prompt_tokens.is_none() => return Err(e.into()),
        Err(_) => None,
    };
    let mut cfg = args.cfg.clone();
    if let Some(tok) = &tokenizer {
        cfg = cfg.for_tokenizer(tok);
    }
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
    let args = match parse_args() {
        Ok(a) => a,
        Err(msg) => {
            eprintln!("{msg}");
            return ExitCode::from(2);
        }
    };
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
