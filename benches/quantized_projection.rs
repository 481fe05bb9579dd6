//! The CPU decode kernel of quantized projections alone, at Phi-4-mini-flash's widths: one
//! input row (a decode step) times a Q8_0, Q4_0 or Q4_K weight, in GB/s of weights read (each
//! call a different copy of the weight, so that they come from memory), next to
//! this machine's memory read bandwidth measured the way `profile --limits` does (f32 summed
//! on every core), so that each figure reads as a fraction of its bound.
//!
//! A third group times a prompt chunk's product (512 rows), quantized against f32, in FLOP/s.
//!
//! `cargo bench --bench quantized_projection` (the CPU's best instruction set), and
//! `YOCO_CPU_ISA=avx2 cargo bench --bench quantized_projection` for the AVX2 kernels on an
//! AVX-512 CPU (`avx2-vnni`: with AVX-VNNI, where the CPU has it).

use std::borrow::Cow;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use yoco::bench_support::{prepare, PreparedWeight};

/// `(input width, output width)`: the MLP's up and down projections and the output head.
const SHAPES: [(usize, usize); 3] = [(2560, 10240), (10240, 2560), (2560, 200064)];

/// Bytes of weights each benchmark cycles through (copies of one weight): more than this
/// machine's last-level cache (480 MiB on some Xeons), so that the weights come from memory, as
/// a whole model's do in a decode step.
const WORKING_SET: usize = 1 << 30;

/// Distinct weight rows quantized; the rest of a weight repeats them (a full 200064-row head
/// would take minutes to quantize, and the kernel reads every byte whatever it holds).
const DISTINCT_ROWS: usize = 512;

fn seeded(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed ^ 0x9E37_79B9_7F4A_7C15;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// A `(n, k)` weight in `format`, its rows repeating [`DISTINCT_ROWS`] quantized ones.
fn weight(format: GgmlDType, k: usize, n: usize) -> Arc<QTensor> {
    let distinct = DISTINCT_ROWS.min(n);
    let w = Tensor::from_vec(seeded(distinct * k, k as u64), (distinct, k), &Device::Cpu).unwrap();
    let q = QTensor::quantize(&(w * 0.05).unwrap(), format).unwrap();
    let src = q.data().unwrap();
    let row = src.len() / distinct;
    let mut bytes = Vec::with_capacity(n * row);
    while bytes.len() < n * row {
        let take = (n * row - bytes.len()).min(src.len());
        bytes.extend_from_slice(&src[..take]);
    }
    let storage = QStorage::from_data(Cow::Owned(bytes), &Device::Cpu, format).unwrap();
    Arc::new(QTensor::new(storage, (n, k)).unwrap())
}

/// Copies of one `(n, k)` weight in `format`, at least [`WORKING_SET`] bytes of them, so that a
/// call on the next copy reads it from memory, not from the cache the last call filled.
fn copies(format: GgmlDType, k: usize, n: usize) -> (Vec<PreparedWeight>, usize) {
    let w = weight(format, k, n);
    let size = w.storage_size_in_bytes();
    let count = WORKING_SET.div_ceil(size).max(2);
    let bytes = w.data().unwrap().into_owned();
    let mut out = vec![prepare(w).unwrap()];
    while out.len() < count {
        let storage = QStorage::from_data(Cow::Owned(bytes.clone()), &Device::Cpu, format).unwrap();
        out.push(prepare(Arc::new(QTensor::new(storage, (n, k)).unwrap())).unwrap());
    }
    (out, size)
}

fn projection(c: &mut Criterion) {
    let isa = yoco::bench_support::active_isa();
    for (name, format) in [
        ("q8_0", GgmlDType::Q8_0),
        ("q4_0", GgmlDType::Q4_0),
        ("q4_k", GgmlDType::Q4K),
    ] {
        let mut group = c.benchmark_group(format!("quantized decode projection {name} {isa}"));
        group.sample_size(20);
        for (k, n) in SHAPES {
            let (copies, size) = copies(format, k, n);
            let x = Tensor::from_vec(seeded(k, 1), (1, k), &Device::Cpu).unwrap();
            group.throughput(Throughput::Bytes(size as u64));
            let mut next = 0;
            group.bench_function(BenchmarkId::from_parameter(format!("{k}x{n}")), |b| {
                b.iter(|| {
                    next = (next + 1) % copies.len();
                    yoco::bench_support::quantized_decode(&x, &copies[next])
                        .unwrap()
                        .unwrap()
                })
            });
        }
        group.finish();
    }
}

/// This machine's memory read bandwidth as `profile --limits` measures it, f32 summed on every
/// core with 32 independent lanes per core, over [`WORKING_SET`] bytes rather than its 512 MB
/// (which a 480 MiB cache partly holds).
fn bandwidth(c: &mut Criterion) {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let data: Vec<f32> = (0..WORKING_SET / 4).map(|i| (i % 7) as f32).collect();
    let mut group = c.benchmark_group("memory read bandwidth");
    group.sample_size(10);
    group.throughput(Throughput::Bytes((data.len() * 4) as u64));
    group.bench_function("f32 sum on every core", |b| {
        b.iter(|| {
            std::thread::scope(|s| {
                let hs: Vec<_> = data
                    .chunks(data.len().div_ceil(threads))
                    .map(|c| {
                        s.spawn(move || {
                            let mut acc = [0f32; 32];
                            for part in c.chunks_exact(32) {
                                for (a, x) in acc.iter_mut().zip(part) {
                                    *a += x;
                                }
                            }
                            acc.iter().sum::<f32>()
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).sum::<f32>()
            })
        })
    });
    group.finish();
}

/// A prompt chunk's product (512 rows) at bench-160m's FFN widths (768 x 4096 fused, 2048 x
/// 768), quantized against the f32 weight through candle's matmul: what a quantized prefill
/// costs against a float one.
fn prefill(c: &mut Criterion) {
    const ROWS: usize = 512;
    let mut group = c.benchmark_group("prefill product, 512 rows");
    group.sample_size(20);
    for (k, n) in [(768, 4096), (2048, 768)] {
        let w = Tensor::from_vec(seeded(n * k, k as u64), (n, k), &Device::Cpu).unwrap();
        let w = (w * 0.05).unwrap();
        let xs = seeded(ROWS * k, 2);
        let x = Tensor::from_vec(xs.clone(), (ROWS, k), &Device::Cpu).unwrap();
        group.throughput(Throughput::Elements((2 * ROWS * n * k) as u64));
        let wt = w.t().unwrap();
        group.bench_function(BenchmarkId::new("f32", format!("{k}x{n}")), |b| {
            b.iter(|| x.matmul(&wt).unwrap())
        });
        for (name, format) in [("q8_0", GgmlDType::Q8_0), ("q4_k", GgmlDType::Q4K)] {
            let q = prepare(Arc::new(QTensor::quantize(&w, format).unwrap())).unwrap();
            group.bench_function(BenchmarkId::new(name, format!("{k}x{n}")), |b| {
                b.iter(|| {
                    yoco::bench_support::quantized_prefill(&xs, ROWS, &q)
                        .unwrap()
                        .unwrap()
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bandwidth, projection, prefill);
criterion_main!(benches);
