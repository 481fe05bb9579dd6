//! Writes a model directory's weights as `model.gguf`, the projections quantized.
//!
//! ```text
//! cargo run --release --example quantize -- --model DIR --quant q8_0|q4_0|q4_k|none --out DIR
//! ```
//!
//! Reads any checkpoint `Model::load` reads (safetensors, sharded, `checkpoint.pth`, another
//! `model.gguf`) one projection at a time, quantizes it as `--quant` asks (the same bytes as
//! quantizing at load time: a projection whose input width does not fit the format takes its
//! fallback or stays float), and writes `OUT/model.gguf` with the config as metadata; the
//! model's `tokenizer.json`, `tokenizer_config.json` and `generation_config.json` are copied
//! beside it. `Model::load(OUT)` then loads the quantized
//! model without quantizing again. Prints what each tensor got and the sizes.

mod common;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Writes DIR's weights as OUT/model.gguf with the projections quantized (the embedding and the
/// norms stay f32), and copies DIR/tokenizer.json beside it.
#[derive(Parser)]
#[command(name = "quantize")]
struct Args {
    /// Model directory to read (params.json and weights in any format yoco loads)
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// Format of the projections: q8_0, q4_0, q4_k, or none (f32)
    #[arg(long, value_name = "Q", value_parser = common::quant)]
    quant: common::Quant,
    /// Directory to write model.gguf (and tokenizer.json) into; created if absent
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    std::fs::create_dir_all(&args.out)?;
    let path = args.out.join("model.gguf");
    let t0 = std::time::Instant::now();
    let weights = yoco::write_gguf(&args.model, &path, args.quant.0)?;
    let seconds = t0.elapsed().as_secs_f64();
    // What the tools read beside the weights (a Phi-4-mini-flash file also carries its configs).
    for name in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        let from = args.model.join(name);
        if from.is_file() && args.out.join(name) != from {
            std::fs::copy(&from, args.out.join(name))?;
        }
    }

    // What each tensor got, grouped by format.
    let mut by_format: Vec<(String, usize, usize)> = Vec::new();
    for w in &weights {
        let name = w.format.name();
        match by_format.iter_mut().find(|(f, _, _)| *f == name) {
            Some(entry) => {
                entry.1 += 1;
                entry.2 += w.bytes;
            }
            None => by_format.push((name, 1, w.bytes)),
        }
    }
    let total: usize = weights.iter().map(|w| w.bytes).sum();
    let as_f32: usize = weights
        .iter()
        .map(|w| 4 * w.shape.iter().product::<usize>())
        .sum();
    println!("wrote {} in {seconds:.2} s", path.display());
    for (format, count, bytes) in &by_format {
        println!(
            "  {format:>5}: {count:4} tensors, {:10.3} MB",
            *bytes as f64 / 1e6
        );
    }
    println!(
        "  total: {:.3} MB of weights ({:.1}% of f32's {:.3} MB); file {:.3} MB",
        total as f64 / 1e6,
        100.0 * total as f64 / as_f32.max(1) as f64,
        as_f32 as f64 / 1e6,
        std::fs::metadata(&path)?.len() as f64 / 1e6
    );
    let other_weights = [
        "model.safetensors",
        "model.safetensors.index.json",
        "checkpoint.pth",
    ];
    if let Some(other) = other_weights.iter().find(|f| args.out.join(f).is_file()) {
        println!(
            "note: {} also holds {other}, which Model::load prefers to model.gguf",
            args.out.display()
        );
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
