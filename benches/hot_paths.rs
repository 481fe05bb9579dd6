//! Micro-benchmarks of the hot paths through the public API, at the bench-160m shape (f32, CPU):
//! a decode step at 1K and 16K context (at 16K the cross-decoder's attention over the global
//! K/V dominates), and one prefill chunk of 512 tokens for gated retention and for the sliding
//! window (W = 1024).
//!
//! `cargo bench --bench hot_paths`

use candle_core::{DType, Device, Tensor};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use yoco::{Config, Model};

fn bench_config(window: Option<usize>) -> Config {
    let mut cfg = Config::new(768, 12, 2048, 3, 12, 4, 32000);
    cfg.sliding_window = window;
    cfg
}

fn ids(n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| i * 31 % 32000).collect()
}

fn row(ids: &[u32]) -> Tensor {
    Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
}

fn decode(c: &mut Criterion) {
    let model = Model::random(&bench_config(None), DType::F32, &Device::Cpu).unwrap();
    let tok = Tensor::new(&[7u32], &Device::Cpu).unwrap();
    let mut group = c.benchmark_group("decode step (bench-160m, gated retention)");
    for ctx in [1024, 16384] {
        let mut cache = model.new_cache(1).unwrap();
        model.prefill(&row(&ids(ctx)), &mut cache).unwrap();
        group.bench_with_input(BenchmarkId::from_parameter(ctx), &ctx, |b, _| {
            b.iter_batched(
                || cache.clone(),
                |mut cache| model.step(&tok, &mut cache).unwrap(),
                criterion::BatchSize::LargeInput,
            )
        });
    }
    group.finish();
}

fn prefill(c: &mut Criterion) {
    let chunk = row(&ids(512));
    let mut group = c.benchmark_group("prefill chunk of 512 (bench-160m)");
    group.sample_size(10);
    for (name, window) in [
        ("gated retention", None),
        ("sliding window 1024", Some(1024)),
    ] {
        let model = Model::random(&bench_config(window), DType::F32, &Device::Cpu).unwrap();
        group.bench_function(name, |b| {
            b.iter(|| {
                let mut cache = model.new_cache(1).unwrap();
                model.prefill_chunked(&chunk, &mut cache, 512).unwrap()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, decode, prefill);
criterion_main!(benches);
