//! A long generation with a small random model: the self-decoder state stays constant and memory
//! grows only by the global K/V bytes of each new token.
//!
//! ```text
//! cargo run --release --example long_run -- [--tokens 100000] [--every 10000] [--window W]
//! ```
//!
//! Prints, every `--every` tokens: position, self-decoder state bytes, global K/V bytes, the
//! process's resident memory, and decode speed.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use yoco::{Config, Model};

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn main() -> yoco::Result<()> {
    let argv: Vec<String> = std::env::args().collect();
    let get = |flag: &str| {
        argv.iter()
            .position(|a| a == flag)
            .and_then(|i| argv.get(i + 1))
            .and_then(|v| v.parse::<usize>().ok())
    };
    let total = get("--tokens").unwrap_or(100_000);
    let every = get("--every").unwrap_or(10_000).max(1);
    let mut cfg = Config::new(64, 4, 128, 2, 4, 2, 512);
    cfg.sliding_window = get("--window");
    let dev = Device::Cpu;
    let model = Model::random(&cfg, DType::F32, &dev)?;
    let mut cache = model.new_cache(1)?;
    println!(
        "config: dim 64, 4 layers, {}; global K/V {} bytes per token",
        match cfg.sliding_window {
            Some(w) => format!("sliding window {w}"),
            None => "gated retention".into(),
        },
        cfg.cache_bytes_per_token(4)
    );
    println!("| position | self state (bytes) | global K/V (bytes) | RSS (MB) | tokens/s |");
    println!("|---|---|---|---|---|");
    let mut tok = 1u32;
    let mut t0 = Instant::now();
    for pos in 1..=total {
        let logits = model.step(&Tensor::new(&[tok], &dev)?, &mut cache)?;
        // Greedy, so the run is deterministic for given weights.
        tok = logits.squeeze(0)?.argmax(0)?.to_scalar::<u32>()?;
        if pos % every == 0 {
            println!(
                "| {pos} | {} | {} | {:.1} | {:.0} |",
                cache.self_state_bytes(),
                cache.global_kv_bytes(),
                rss_bytes() as f64 / 1e6,
                every as f64 / t0.elapsed().as_secs_f64()
            );
            t0 = Instant::now();
        }
    }
    Ok(())
}
