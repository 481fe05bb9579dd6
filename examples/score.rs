//! Scores a sequence with a YOCO model: mean next-token negative log-likelihood and perplexity.
//!
//! ```text
//! cargo run --release --example score -- --model DIR --tokens-file IDS.json [--json]
//!     [--dump-logits OUT.safetensors] [--device cpu|cuda|cuda:N] [--dtype f32|bf16|f16]
//!     [--quant q8_0|q4_0|q4_k]
//! cargo run --release --example score -- --model DIR --text-file TEXT.txt [--json] ...
//! ```
//!
//! With `--quant`, the projections are quantized as the model loads, and the same sequence is
//! scored by the checkpoint as stored too: its NLL (and bits per byte) are printed beside the
//! quantized model's, with the difference.
//!
//! `IDS.json` is a JSON array of token ids. The model runs one causal forward over the ids
//! (a fresh cache, in chunks that continue the same cache so memory stays bounded); the mean NLL
//! (natural log) is taken over positions 1..T, position t predicting token t from tokens < t,
//! and the perplexity is its exp.
//!
//! With `--text-file`, the text is tokenized with the model directory's `tokenizer.json` (BOS
//! prepended when the tokenizer has one) and bits per byte are reported too: the total NLL in
//! bits over the predicted tokens divided by the text's UTF-8 byte count.
//!
//! A bad command line (unknown flag, missing or malformed value, neither or both inputs) is
//! clap's usage error and exit code 2; any other bad input (a file, the ids, the model) is one
//! line `error: ...` on stderr and exit code 1.

mod common;

use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, D};
use clap::Parser;
use yoco::{GenerationConfig, Model, Tokenizer};

/// Scores token ids (or text) with a YOCO model: mean next-token NLL and perplexity.
///
/// The mean NLL (natural log) is over positions 1..T: token t predicted from tokens < t.
#[derive(Debug, Parser)]
#[command(name = "score")]
#[command(group = clap::ArgGroup::new("input").required(true).args(["tokens_file", "text_file"]))]
struct Args {
    /// Model directory (params.json + weights)
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// JSON array of token ids, e.g. [0, 17, 4, 99]
    #[arg(long, value_name = "FILE")]
    tokens_file: Option<PathBuf>,
    /// UTF-8 text, tokenized with DIR/tokenizer.json (BOS prepended when the tokenizer has
    /// one); also reports bits per byte
    #[arg(long, value_name = "FILE")]
    text_file: Option<PathBuf>,
    /// Write the logits of every position to OUT (safetensors, tensor `logits`, shape (T,
    /// vocab), f32)
    #[arg(long, value_name = "OUT")]
    dump_logits: Option<PathBuf>,
    /// Print one JSON object: {"tokens": N, "mean_nll": x, "perplexity": y, "seconds": s} (with
    /// --text-file also "bytes" and "bits_per_byte")
    #[arg(long)]
    json: bool,
    /// cpu, cuda or cuda:N (CUDA needs a build with `--features cuda`)
    #[arg(long, value_name = "DEVICE", default_value = "cpu", value_parser = common::device)]
    device: Device,
    /// Weight dtype: f32, bf16 or f16
    #[arg(long, value_name = "DTYPE", default_value = "f32", value_parser = common::dtype)]
    dtype: DType,
    /// Quantize the projections as the model loads (q8_0, q4_0 or q4_k) and also score with the
    /// checkpoint as stored, printing both
    #[arg(long, value_name = "Q", default_value = "none", value_parser = common::quant)]
    quant: common::Quant,
}

/// Where the sequence comes from.
///
/// To add another input kind, add a variant here, a flag to [`Args`] (and to its `input` group)
/// and its arm in [`Args::input`], and turn it into ids in `read_input`; scoring and reporting
/// do not change.
#[derive(Debug)]
enum Input {
    /// A JSON array of token ids.
    Tokens(PathBuf),
    /// UTF-8 text for the model's tokenizer.
    Text(PathBuf),
}

impl Args {
    /// The input the flags name (clap's `input` group lets exactly one through).
    fn input(&self) -> Res<Input> {
        match (&self.tokens_file, &self.text_file) {
            (Some(path), None) => Ok(Input::Tokens(path.clone())),
            (None, Some(path)) => Ok(Input::Text(path.clone())),
            _ => Err("give one of --tokens-file and --text-file".into()),
        }
    }
}

/// Ids to score, and for text the number of UTF-8 bytes they encode.
struct Sequence {
    ids: Vec<u32>,
    text_bytes: Option<usize>,
}

/// What scoring found.
#[derive(Clone, Copy)]
struct Score {
    /// Sum of -ln p(token t | tokens < t) over t in 1..T.
    total_nll: f64,
    /// T - 1.
    predicted: usize,
    seconds: f64,
}

type Res<T> = std::result::Result<T, String>;

fn err(context: impl Display, e: impl Display) -> String {
    format!("{context}: {e}")
}

fn read_file(path: &Path) -> Res<Vec<u8>> {
    std::fs::read(path).map_err(|e| err(format!("cannot read {}", path.display()), e))
}

/// A JSON array of ids in 0..=u32::MAX.
fn parse_ids(path: &Path) -> Res<Vec<u32>> {
    let bytes = read_file(path)?;
    let what = || {
        format!(
            "{} must be a JSON array of non-negative integer token ids",
            path.display()
        )
    };
    let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| err(what(), e))?;
    let serde_json::Value::Array(items) = value else {
        return Err(format!("{}, got {}", what(), kind(&value)));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            item.as_u64()
                .and_then(|x| u32::try_from(x).ok())
                .ok_or_else(|| format!("{}: element {i} is {item}", what()))
        })
        .collect()
}

fn kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// The ids to score. New input kinds plug in here (see [`Input`]).
fn read_input(input: &Input, model_dir: &Path) -> Res<Sequence> {
    match input {
        Input::Tokens(path) => Ok(Sequence {
            ids: parse_ids(path)?,
            text_bytes: None,
        }),
        Input::Text(path) => {
            let text = String::from_utf8(read_file(path)?)
                .map_err(|e| err(format!("{} is not UTF-8 text", path.display()), e))?;
            let tok = Tokenizer::from_model_dir(model_dir).map_err(|e| e.to_string())?;
            let ids = tok.encode(&text, true).map_err(|e| e.to_string())?;
            Ok(Sequence {
                ids,
                text_bytes: Some(text.len()),
            })
        }
    }
}

/// One causal forward over `ids` from a fresh cache, in chunks continuing that cache (the same
/// logits as a single `Model::forward`, with memory bounded by the chunk). Returns the NLL of
/// every prediction, and the logits `(T, vocab)` when `keep_logits`.
fn score(model: &Model, ids: &[u32], keep_logits: bool) -> yoco::Result<(Score, Option<Tensor>)> {
    let start = Instant::now();
    let device = model.device();
    let mut cache = model.new_cache(1)?;
    cache.reserve(ids.len())?;
    let mut total_nll = 0.0f64;
    let mut kept = Vec::new();
    let chunk = GenerationConfig::default().prefill_chunk;
    for (c, part) in ids.chunks(chunk).enumerate() {
        let logits = model
            .forward(&Tensor::new(part, device)?.unsqueeze(0)?, &mut cache)?
            .squeeze(0)?;
        // Row r (position c*chunk + r) predicts the token after it, if there is one.
        let first = c * chunk;
        let n = part.len().min(ids.len() - 1 - first);
        if n > 0 {
            let targets = Tensor::new(&ids[first + 1..first + 1 + n], device)?.unsqueeze(1)?;
            let logp = candle_nn::ops::log_softmax(&logits.narrow(0, 0, n)?, D::Minus1)?;
            let picked: Vec<f32> = logp.gather(&targets, 1)?.squeeze(1)?.to_vec1()?;
            total_nll -= picked.iter().map(|&x| f64::from(x)).sum::<f64>();
        }
        if keep_logits {
            kept.push(logits.to_device(&Device::Cpu)?);
        }
    }
    let logits = if keep_logits {
        Some(Tensor::cat(&kept, 0)?)
    } else {
        None
    };
    let score = Score {
        total_nll,
        predicted: ids.len() - 1,
        seconds: start.elapsed().as_secs_f64(),
    };
    Ok((score, logits))
}

fn run(args: Args) -> Res<()> {
    let seq = read_input(&args.input()?, &args.model)?;
    if seq.ids.is_empty() {
        return Err("no tokens to score: the sequence is empty".into());
    }
    if seq.ids.len() < 2 {
        return Err("need at least 2 tokens: the first token is never predicted".into());
    }

    let load = |quant| {
        let options = yoco::LoadOptions {
            device: args.device.clone(),
            dtype: args.dtype,
            quant,
            ..yoco::LoadOptions::default()
        };
        Model::load_with(&args.model, &options).map_err(|e| e.to_string())
    };
    let load_start = Instant::now();
    let model = load(args.quant.0)?;
    let load_seconds = load_start.elapsed().as_secs_f64();
    let vocab = model.config().vocab_size();
    if let Some((i, &id)) = seq
        .ids
        .iter()
        .enumerate()
        .find(|(_, &id)| id as usize >= vocab)
    {
        return Err(format!(
            "token id {id} (element {i}) is out of range for the model's vocabulary of {vocab}"
        ));
    }
    let max = model.config().max_positions();
    if seq.ids.len() > max {
        return Err(format!(
            "{} tokens are more than the model's max_positions {max}",
            seq.ids.len()
        ));
    }

    let (scored, logits) =
        score(&model, &seq.ids, args.dump_logits.is_some()).map_err(|e| e.to_string())?;
    if let (Some(path), Some(logits)) = (&args.dump_logits, logits) {
        let tensors = std::collections::HashMap::from([("logits", logits)]);
        candle_core::safetensors::save(&tensors, path)
            .map_err(|e| err(format!("cannot write {}", path.display()), e))?;
    }
    // With --quant: the same sequence through the checkpoint as stored, for comparison.
    let float = match args.quant.0 {
        Some(_) => {
            drop(model);
            let float = load(None)?;
            Some(score(&float, &seq.ids, false).map_err(|e| e.to_string())?.0)
        }
        None => None,
    };
    let bpb = |s: &Score| {
        seq.text_bytes
            .filter(|&b| b > 0)
            .map(|b| s.total_nll / std::f64::consts::LN_2 / b as f64)
    };

    let score = scored;
    let mean_nll = score.total_nll / score.predicted as f64;
    let perplexity = mean_nll.exp();
    let bits_per_byte = bpb(&score);
    let mut report = String::new();
    if args.json {
        // Written by hand to keep the documented key order; non-finite numbers become null.
        let num = |x: f64| serde_json::Value::from(x).to_string();
        report = format!(
            "{{\"tokens\": {}, \"mean_nll\": {}, \"perplexity\": {}, \"seconds\": {}",
            seq.ids.len(),
            num(mean_nll),
            num(perplexity),
            num(score.seconds)
        );
        if let Some(bytes) = seq.text_bytes {
            let bpb = bits_per_byte.map_or_else(|| "null".to_string(), num);
            report.push_str(&format!(", \"bytes\": {bytes}, \"bits_per_byte\": {bpb}"));
        }
        if let (Some(q), Some(f)) = (args.quant.0, &float) {
            let f_nll = f.total_nll / f.predicted as f64;
            report.push_str(&format!(
                ", \"quant\": \"{q}\", \"float_mean_nll\": {}",
                num(f_nll)
            ));
            if seq.text_bytes.is_some() {
                let f_bpb = bpb(f).map_or_else(|| "null".to_string(), num);
                report.push_str(&format!(", \"float_bits_per_byte\": {f_bpb}"));
            }
        }
        report.push_str("}\n");
    } else {
        let mut line = |s: String| {
            report.push_str(&s);
            report.push('\n');
        };
        line(format!("model       {}", args.model.display()));
        line(format!(
            "tokens      {} ({} predicted)",
            seq.ids.len(),
            score.predicted
        ));
        line(format!("mean NLL    {mean_nll:.6} nats/token"));
        line(format!("perplexity  {perplexity:.4}"));
        if let Some(bytes) = seq.text_bytes {
            line(format!("bytes       {bytes}"));
        }
        if let Some(bpb) = bits_per_byte {
            line(format!("bits/byte   {bpb:.6}"));
        }
        if let (Some(q), Some(f)) = (args.quant.0, &float) {
            let f_nll = f.total_nll / f.predicted as f64;
            let mut text = format!("mean NLL {f_nll:.6}");
            let mut change = format!("mean NLL {:+.6}", mean_nll - f_nll);
            if let (Some(a), Some(b)) = (bits_per_byte, bpb(f)) {
                text.push_str(&format!(", bits/byte {b:.6}"));
                change.push_str(&format!(", bits/byte {:+.6}", a - b));
            }
            line(format!("quant       {q} (the lines above)"));
            line(format!("unquantized {text}"));
            line(format!("{q} change {change}"));
        }
        line(format!(
            "time        {:.3} s scoring ({:.0} tokens/s), {load_seconds:.3} s loading",
            score.seconds,
            seq.ids.len() as f64 / score.seconds.max(1e-9)
        ));
        if let Some(path) = &args.dump_logits {
            line(format!("logits      {}", path.display()));
        }
    }
    print(&report)
}

/// Writes to stdout without panicking when it is closed (`println!` would).
fn print(text: &str) -> Res<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|e| err("cannot write to stdout", e))
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            use std::io::Write;
            // One line, whatever the underlying error printed.
            let line: Vec<&str> = e.split_whitespace().collect();
            let _ = writeln!(std::io::stderr(), "error: {}", line.join(" "));
            ExitCode::from(1)
        }
    }
}
