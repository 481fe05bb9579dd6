//! Micro-benchmarks of the hot paths through the public API, at the bench-160m shape (f32, CPU):
//! a decode step at 1K and 16K context (at 16K the cross-decoder's attention over the global
//! K/V dominates), and one prefill chunk of 512 tokens for gated retention and for the sliding
//! window (W = 1024); and a step of 16 sequences at once at 1K context, f32 and Q8_0 (the
//! batched kernels, each sequence's retention state and attention); and one draw from the
//! random model's 32K logits as a server samples (temperature 0.8, top-p 0.95, with and
//! without the chosen token's log-probability): a random model's distribution is nearly flat,
//! the sampler's slowest case.
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
        // Room for two more tokens: the prefill sizes the global K/V to the prompt exactly.
        cache.reserve(ctx + 2).unwrap();
        group.bench_with_input(BenchmarkId::from_parameter(ctx), &ctx, |b, _| {
            b.iter_batched(
                // A clone shares its buffers until written: one untimed step gives it its own,
                // else the timed step would copy the whole global K/V (32 MB at 16K) first.
                || {
                    let mut fork = cache.clone();
                    model.step(&tok, &mut fork).unwrap();
                    fork
                },
                |mut cache| model.step(&tok, &mut cache).unwrap(),
                criterion::BatchSize::LargeInput,
            )
        });
    }
    group.finish();
}

fn batched_decode(c: &mut Criterion) {
    const ROWS: usize = 16;
    let prompts: Vec<u32> = (0..ROWS).flat_map(|r| ids(1024 + r).split_off(r)).collect();
    let prompts = Tensor::from_vec(prompts, (ROWS, 1024), &Device::Cpu).unwrap();
    let next = Tensor::from_vec(vec![7u32; ROWS], (ROWS, 1), &Device::Cpu).unwrap();
    let mut group = c.benchmark_group("decode step of 16 sequences at 1K (bench-160m)");
    group.sample_size(20);
    for (name, quant) in [("f32", None), ("q8_0", Some(yoco::Quant::Q8_0))] {
        let options = yoco::LoadOptions {
            quant,
            ..yoco::LoadOptions::default()
        };
        let model = Model::random_with(&bench_config(None), &options).unwrap();
        let mut cache = model.new_cache(ROWS).unwrap();
        model.prefill(&prompts, &mut cache).unwrap();
        // One cache stepped on, as a server's batch is: its context grows by a few hundred
        // tokens over the run, and the step's buffers are reused rather than fresh pages.
        group.bench_function(name, |b| b.iter(|| model.step(&next, &mut cache).unwrap()));
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

fn sampling(c: &mut Criterion) {
    let model = Model::random(&bench_config(None), DType::F32, &Device::Cpu).unwrap();
    let mut cache = model.new_cache(1).unwrap();
    let logits: Vec<f32> = model
        .prefill(&row(&ids(64)), &mut cache)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let mut sampler = yoco::Sampler::new(yoco::Sampling::default(), 7, Vec::new()).unwrap();
    let mut scratch = logits.clone();
    let mut group = c.benchmark_group("draw from bench-160m's 32K logits");
    group.bench_function("sample", |b| {
        b.iter(|| {
            scratch.copy_from_slice(&logits);
            sampler.sample(&mut scratch, &[]).unwrap()
        })
    });
    group.bench_function("sample with logprob", |b| {
        b.iter(|| {
            scratch.copy_from_slice(&logits);
            sampler.sample_with_logprobs(&mut scratch, &[], 0).unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, decode, batched_decode, prefill, sampling);
criterion_main!(benches);
