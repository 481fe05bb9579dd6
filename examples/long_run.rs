//! A long generation with a small random model: the self-decoder state stays constant and memory
//! grows only by the global K/V bytes of each new token.
//!
//! ```text
//! cargo run --release --example long_run -- [--tokens 100000] [--every 10000] [--window W]
//!     [--quant q8_0|q4_0|q4_k]
//! ```
//!
//! Prints, every `--every` tokens: position, self-decoder state bytes, global K/V bytes, the
//! process's resident memory, and decode speed.

mod common;

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use clap::Parser;
use yoco::{Config, Model};

/// Decodes a long sequence with a tiny random YOCO (dim 64, 4 layers) and prints, every
/// `--every` tokens, the self-decoder state, the global K/V and the process's resident memory.
#[derive(Parser)]
#[command(name = "long_run")]
struct Args {
    /// Tokens to decode
    #[arg(long, value_name = "N", default_value_t = 100_000)]
    tokens: usize,
    /// Print a row every N tokens
    #[arg(long, value_name = "N", default_value_t = 10_000,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    every: usize,
    /// Sliding-window self-decoder of W tokens instead of gated retention
    #[arg(long, value_name = "W")]
    window: Option<usize>,
    /// Quantize the projections: q8_0, q4_0 or q4_k (q4_k takes Q5_0 at this width of 64)
    #[arg(long, value_name = "Q", default_value = "none", value_parser = common::quant)]
    quant: common::Quant,
}

fn main() -> yoco::Result<()> {
    let args = Args::parse();
    let every = args.every;
    let mut cfg = Config::new(64, 4, 128, 2, 4, 2, 512);
    cfg.sliding_window = args.window;
    let dev = Device::Cpu;
    let model = match args.quant.0 {
        None => Model::random(&cfg, DType::F32, &dev)?,
        quant => {
            let options = yoco::LoadOptions {
                quant,
                ..yoco::LoadOptions::default()
            };
            Model::random_with(&cfg, &options)?
        }
    };
    let mut cache = model.new_cache(1)?;
    println!(
        "config: dim 64, 4 layers, {}; global K/V {} bytes per token; weights {} ({} bytes)",
        match cfg.sliding_window {
            Some(w) => format!("sliding window {w}"),
            None => "gated retention".into(),
        },
        cfg.cache_bytes_per_token(4),
        common::quant_name(args.quant.0),
        model.weight_bytes()
    );
    println!("| position | self state (bytes) | global K/V (bytes) | RSS (MB) | tokens/s |");
    println!("|---|---|---|---|---|");
    let mut tok = 1u32;
    let mut t0 = Instant::now();
    for pos in 1..=args.tokens {
        // Greedy, so the run is deterministic for given weights.
        tok = common::next_token(&model.step(&Tensor::new(&[tok], &dev)?, &mut cache)?)?;
        if pos % every == 0 {
            println!(
                "| {pos} | {} | {} | {:.1} | {:.0} |",
                cache.self_state_bytes(),
                cache.global_kv_bytes(),
                common::rss_bytes() as f64 / 1e6,
                every as f64 / t0.elapsed().as_secs_f64()
            );
            t0 = Instant::now();
        }
    }
    Ok(())
}
