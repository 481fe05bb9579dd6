//! Micro-benchmarks of the hot pieces, at the bench-160m shape (f32, CPU):
//! a retention decode step, a chunkwise retention prefill chunk, cross-attention of one query
//! over a global K/V of 1K/16K/64K rows, a full decode step and a full prefill chunk.
//!
//! `cargo bench --bench hot_paths`

use candle_core::{DType, Device, Tensor};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use yoco::{Config, Model};

fn bench_config() -> Config {
    Config::new(768, 12, 2048, 3, 12, 4, 32000)
}

fn random_model(cfg: &Config) -> Model {
    Model::random(cfg, DType::F32, &Device::Cpu).unwrap()
}

fn retention(c: &mut Criterion) {
    let dev = Device::Cpu;
    let (h, d) = (3, 256);
    let state = Tensor::randn(0f32, 1.0, (1, h, d, d), &dev).unwrap();
    let q = Tensor::randn(0f32, 1.0, (1, h, 1, d), &dev).unwrap();
    let lg = (Tensor::ones((1, h, 1), DType::F32, &dev).unwrap() * -0.01).unwrap();
    c.bench_function("retention decode step (3 heads x 256)", |b| {
        b.iter(|| yoco::retention::recurrent_step(&q, &q, &q, &lg, &state).unwrap())
    });
    let t = 256;
    let qc = Tensor::randn(0f32, 1.0, (1, h, t, d), &dev).unwrap();
    let lgc = (Tensor::ones((1, h, t), DType::F32, &dev).unwrap() * -0.01).unwrap();
    c.bench_function("retention chunk of 256 (3 heads x 256)", |b| {
        b.iter(|| yoco::retention::chunkwise(&qc, &qc, &qc, &lgc, &state, 256).unwrap())
    });
}

fn cross_attention(c: &mut Criterion) {
    let dev = Device::Cpu;
    let mut group = c.benchmark_group("cross-attention, 1 query, 12 heads over 4 KV heads");
    for rows in [1024, 16384, 65536] {
        let q = Tensor::randn(0f32, 1.0, (1, 12, 1, 64), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (1, 4, rows, 64), &dev).unwrap();
        group.bench_with_input(BenchmarkId::from_parameter(rows), &rows, |b, _| {
            b.iter(|| yoco::attention::attention(&q, &k, &k, None, 0.125).unwrap())
        });
    }
    group.finish();
}

fn model(c: &mut Criterion) {
    let cfg = bench_config();
    let model = random_model(&cfg);
    let dev = Device::Cpu;
    let ids: Vec<u32> = (0..1024u32).map(|i| i * 31 % 32000).collect();
    let mut cache = model.new_cache(1).unwrap();
    model
        .prefill(
            &Tensor::new(&ids[..], &dev).unwrap().unsqueeze(0).unwrap(),
            &mut cache,
        )
        .unwrap();
    let tok = Tensor::new(&[7u32], &dev).unwrap();
    c.bench_function("full decode step at 1K context (bench-160m)", |b| {
        b.iter_batched(
            || cache.clone(),
            |mut cache| model.step(&tok, &mut cache).unwrap(),
            criterion::BatchSize::LargeInput,
        )
    });
    let chunk = Tensor::new(&ids[..512], &dev)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let mut group = c.benchmark_group("prefill");
    group.sample_size(10);
    group.bench_function("full prefill chunk of 512 (bench-160m)", |b| {
        b.iter(|| {
            let mut cache = model.new_cache(1).unwrap();
            model.prefill_chunked(&chunk, &mut cache, 512).unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, retention, cross_attention, model);
criterion_main!(benches);
