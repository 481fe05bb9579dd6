use super::*;
use crate::kernels::isa::Level;
use candle_core::quantized::k_quants;

fn seeded(shape: &[usize], seed: u64) -> Result<Tensor> {
    crate::kernels::testing::uniform(shape, seed, 1.0)
}

/// candle's own quantized matmul over the same blocks (its generic path, which never takes
/// the kernels here): the same products.
fn candle_matmul<T: GgmlType>(x: &[f32], q: &QTensor, rows: usize) -> Result<Vec<f32>> {
    let (n, k) = q.shape().dims2()?;
    let data = q.data()?;
    let w = blocks::<T>(&data).ok_or_else(|| crate::Error::Input("blocks".into()))?;
    let mut out = vec![0f32; rows * n];
    k_quants::matmul((rows, k, n), x, w, &mut out)?;
    Ok(out)
}

/// Q8_0 or Q4_0 with exact block sums, written as the definition: each input row
/// quantized to Q8_0 blocks as candle does, each block's 32 products summed in i32,
/// converted, and added in f32 by one multiply-add with the product of the two scales,
/// block after block.
fn exact_sums_reference(x: &[f32], q: &QTensor, rows: usize) -> Result<Vec<f32>> {
    let (n, k) = q.shape().dims2()?;
    let kb = k / 32;
    let input = Tensor::from_vec(x[..rows * k].to_vec(), (rows, k), &Device::Cpu)?;
    let input = QTensor::quantize(&input, GgmlDType::Q8_0)?.data()?.to_vec();
    let weight = q.data()?;
    // Block `b` of row `r` as its scale and 32 weights: Q8_0's 34 bytes (an f16 scale, 32
    // i8), or Q4_0's 18 (an f16 scale, then byte `i` holds weight `i` in its low nibble and
    // weight `16 + i` in its high one, each plus 8).
    let block = |bytes: &[u8], size: usize, r: usize, b: usize| {
        let at = (r * kb + b) * size;
        let d = half::f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32();
        let body = &bytes[at + 2..at + size];
        let w: Vec<i32> = if size == 34 {
            body.iter().map(|&v| i32::from(v as i8)).collect()
        } else {
            let low = body.iter().map(|&v| i32::from(v & 15) - 8);
            low.chain(body.iter().map(|&v| i32::from(v >> 4) - 8))
                .collect()
        };
        (d, w)
    };
    let size = if q.dtype() == GgmlDType::Q4_0 { 18 } else { 34 };
    let mut out = vec![0f32; rows * n];
    for r in 0..rows {
        for j in 0..n {
            let mut acc = 0f32;
            for b in 0..kb {
                let (wd, wq) = block(&weight, size, j, b);
                let (xd, xq) = block(&input, 34, r, b);
                let sum: i32 = wq.iter().zip(&xq).map(|(&a, &c)| a * c).sum();
                acc = (wd * xd).mul_add(sum as f32, acc);
            }
            out[r * n + j] = acc;
        }
    }
    Ok(out)
}

/// A Q4_K block's eight 6-bit scales and eight 6-bit mins from its 12 packed bytes (ggml's
/// `get_scale_min_k4`).
fn unpack_scales_mins(q: &[u8]) -> ([u8; 8], [u8; 8]) {
    let mut scales = [0u8; 8];
    let mut mins = [0u8; 8];
    for j in 0..4 {
        scales[j] = q[j] & 63;
        mins[j] = q[j + 4] & 63;
        scales[j + 4] = (q[j + 8] & 15) | ((q[j] >> 6) << 4);
        mins[j + 4] = (q[j + 8] >> 4) | ((q[j + 4] >> 6) << 4);
    }
    (scales, mins)
}

/// Q4_K with exact block sums, written as the definition: each input row quantized to
/// Q8_K blocks as candle does; per block, each sub-block of 32's products of nibble and
/// input summed in i32 and times its 6-bit scale, its mins times the sub-block's input sum,
/// the two totals converted and added in f32 by a multiply-add each, `d` then `-dmin`
/// times the input's scale, block after block.
fn q4k_exact_reference(x: &[f32], q: &QTensor, rows: usize) -> Result<Vec<f32>> {
    let (n, k) = q.shape().dims2()?;
    let kb = k / 256;
    let input = Tensor::from_vec(x[..rows * k].to_vec(), (rows, k), &Device::Cpu)?;
    let input = QTensor::quantize(&input, GgmlDType::Q8K)?.data()?.to_vec();
    let weight = q.data()?;
    let f16 = |b: &[u8], at: usize| half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32();
    let mut out = vec![0f32; rows * n];
    for r in 0..rows {
        for j in 0..n {
            let mut acc = 0f32;
            for b in 0..kb {
                let w = &weight[(j * kb + b) * 144..(j * kb + b + 1) * 144];
                let xb = &input[(r * kb + b) * 292..(r * kb + b + 1) * 292];
                let xd = f32::from_le_bytes([xb[0], xb[1], xb[2], xb[3]]);
                let (scales, mins) = unpack_scales_mins(&w[4..16]);
                let (mut sums, mut mins_total) = (0i32, 0i32);
                for sub in 0..8 {
                    let (pair, high) = (sub / 2, sub % 2 == 1);
                    let mut dot = 0i32;
                    let mut xsum = 0i32;
                    for l in 0..32 {
                        let byte = w[16 + 32 * pair + l];
                        let nib = if high { byte >> 4 } else { byte & 15 };
                        let xv = i32::from(xb[4 + 32 * sub + l] as i8);
                        dot += i32::from(nib) * xv;
                        xsum += xv;
                    }
                    sums += i32::from(scales[sub]) * dot;
                    mins_total += i32::from(mins[sub]) * xsum;
                }
                acc = (f16(w, 0) * xd).mul_add(sums as f32, acc);
                acc = (-(f16(w, 2) * xd)).mul_add(mins_total as f32, acc);
            }
            out[r * n + j] = acc;
        }
    }
    Ok(out)
}

/// The reference for rows of width `k` of `format`: candle's matmul, or nothing where the
/// kernel dequantizes rows (candle's dot would assert).
fn candle_reference(format: GgmlDType, xs: &[f32], q: &QTensor, rows: usize) -> Result<Vec<f32>> {
    let k = q.shape().dims2()?.1;
    match format {
        GgmlDType::Q8_0 => candle_matmul::<BlockQ8_0>(xs, q, rows),
        GgmlDType::Q4_0 => candle_matmul::<BlockQ4_0>(xs, q, rows),
        GgmlDType::Q5_0 if needs_even_blocks(format, k) => Ok(Vec::new()),
        GgmlDType::Q5_0 => candle_matmul::<BlockQ5_0>(xs, q, rows),
        _ => candle_matmul::<BlockQ4K>(xs, q, rows),
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|f| f.to_bits()).collect()
}

/// Checks `got` (`rows` rows of the fused pieces' outputs, `held` as the kernels read
/// them) against candle's matmul and against the dequantized weights times the float input
/// in f64.
fn check_against_references(
    format: GgmlDType,
    isa: Isa,
    xs: &[f32],
    pieces: &[Arc<QTensor>],
    held: &[Arc<QWeight>],
    rows: usize,
    got: &[f32],
) -> Result<()> {
    let total: usize = pieces.iter().map(|q| q.shape().dims()[0]).sum();
    let mut offset = 0;
    for (q, held) in pieces.iter().zip(held) {
        let (n, k) = q.shape().dims2()?;
        let want = candle_reference(format, xs, q, rows)?;
        // Interleaved rows sum each block exactly: the definition's bits. (Rows in
        // candle's layout take candle's dot products.)
        let exact_sums = isa.level() != Level::Portable && held.interleaved();
        let definition = match (exact_sums, format) {
            (false, _) => Vec::new(),
            (true, GgmlDType::Q4K) => q4k_exact_reference(xs, q, rows)?,
            (true, _) => exact_sums_reference(xs, q, rows)?,
        };
        // The input's own quantization (8 bits per block) is all that separates the kernel
        // from the dequantized product.
        let w: Vec<f32> = q.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1()?;
        for r in 0..rows {
            for j in 0..n {
                let g = got[r * total + offset + j];
                let exact: f64 = (0..k)
                    .map(|t| w[j * k + t] as f64 * xs[r * k + t] as f64)
                    .sum();
                let scale: f64 = (0..k).map(|t| (w[j * k + t] as f64).abs()).sum();
                if want.is_empty() {
                    assert!((g as f64 - exact).abs() <= 1e-5 * scale + 1e-6);
                    continue;
                }
                let c = want[r * n + j];
                if exact_sums {
                    let e = definition[r * n + j];
                    assert_eq!(
                        g.to_bits(),
                        e.to_bits(),
                        "{isa:?} {format:?} k {k}: {g} {e}"
                    );
                }
                if format == GgmlDType::Q4K && !exact_sums {
                    // No tolerance: the same integer sums, converted, scaled and added by
                    // the same f32 operations in the same order as candle's (its own dot
                    // product on the portable path).
                    assert_eq!(
                        g.to_bits(),
                        c.to_bits(),
                        "{isa:?} {format:?} k {k}: {g} {c}"
                    );
                }
                assert!(
                    (g - c).abs() <= 1e-5 * (1.0 + c.abs()),
                    "{isa:?} {format:?} k {k}: {g} {c}"
                );
                assert!(
                    (g as f64 - exact).abs() <= 0.01 * scale + 1e-6,
                    "{isa:?} {format:?} k {k}: {g} {exact}"
                );
            }
        }
        offset += n;
    }
    Ok(())
}

fn quantized_pieces(format: GgmlDType, k: usize, widths: &[usize]) -> Result<Vec<Arc<QTensor>>> {
    widths
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let w = (seeded(&[n, k], (7 * n + i + k) as u64)? * 0.05)?;
            Ok(Arc::new(QTensor::quantize(&w, format)?))
        })
        .collect()
}

/// `pieces` as a layer holds them for the kernels of `isa`: as loaded, and (where that
/// differs: Q8_0 and Q4_0 pieces of rows divisible by eight, with AVX2) as
/// [`QWeight::prepared`] lays them out.
fn forms(pieces: &[Arc<QTensor>], isa: Isa) -> Result<Vec<Vec<Arc<QWeight>>>> {
    let loaded: Vec<_> = pieces
        .iter()
        .map(|q| Arc::new(QWeight::Blocks(q.clone())))
        .collect();
    let prepared = pieces
        .iter()
        .map(|q| QWeight::prepared(q.clone(), isa).map(Arc::new))
        .collect::<Result<Vec<_>>>()?;
    Ok(if prepared.iter().any(|q| q.interleaved()) {
        vec![loaded, prepared]
    } else {
        vec![loaded]
    })
}

/// Rows interleaved by eight come back as they were, and a band of them from its start;
/// other formats and shapes decline.
#[test]
fn interleaved_rows_are_the_same_bytes() -> Result<()> {
    for (format, size, k) in [
        (GgmlDType::Q8_0, 34, 96),
        (GgmlDType::Q4_0, 18, 96),
        (GgmlDType::Q4K, 144, 768),
    ] {
        let q = QTensor::quantize(&seeded(&[24, k], 3)?, format)?;
        let bytes = q.data()?;
        let mixed = interleave(format, &bytes, 24, k)
            .ok_or_else(|| crate::Error::Input("24 rows of 3 blocks interleave".into()))?;
        assert_eq!(mixed.len(), bytes.len());
        assert_ne!(mixed[..], bytes[..]);
        let mut back = vec![0u8; bytes.len()];
        assert!(deinterleave(format, &mixed, 3, 0, &mut back));
        assert_eq!(back[..], bytes[..]);
        let mut band = vec![0u8; 5 * 3 * size];
        assert!(deinterleave(format, &mixed, 3, 11, &mut band));
        assert_eq!(band[..], bytes[11 * 3 * size..16 * 3 * size]);
        assert!(!deinterleave(format, &mixed, 3, 20, &mut band));
        assert!(interleave(format, &bytes, 24, 2 * k).is_none());
        assert!(interleave(format, &bytes[1..], 24, k).is_none());
        // Twenty rows: the last group padded with zeros.
        let twenty = &bytes[..20 * 3 * size];
        let padded = interleave(format, twenty, 20, k)
            .ok_or_else(|| crate::Error::Input("20 rows interleave".into()))?;
        assert_eq!(padded.len(), 24 * 3 * size);
        let mut back = vec![0u8; twenty.len()];
        assert!(deinterleave(format, &padded, 3, 0, &mut back));
        assert_eq!(back[..], twenty[..]);
        let mut pad = vec![1u8; 4 * 3 * size];
        assert!(deinterleave(format, &padded, 3, 20, &mut pad));
        assert!(pad.iter().all(|&b| b == 0));
    }
    let q = QTensor::quantize(&seeded(&[8, 256], 3)?, GgmlDType::Q6K)?;
    assert!(interleave(GgmlDType::Q6K, &q.data()?, 8, 256).is_none());
    Ok(())
}

/// The tests' reading of Q4_K's packed scales and mins is candle's: a sub-block whose
/// nibbles are all 1 dequantizes to `d sc - dmin m`.
#[test]
fn q4_k_scales_and_mins_unpack_as_candle_reads_them() -> Result<()> {
    // Sub-block `s` of a block whose nibbles are all 1 dequantizes to `d sc_s - dmin m_s`.
    let q = QTensor::quantize(&seeded(&[1, 256], 4)?, GgmlDType::Q4K)?;
    let mut bytes = q.data()?.to_vec();
    bytes[16..144].fill(0x11);
    let (scales, mins) = unpack_scales_mins(&bytes[4..16]);
    let f16 = |at: usize| half::f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32();
    let mut got = vec![0f32; 256];
    assert!(dequantize_into(
        Isa::cpu().at_most(Level::Portable),
        GgmlDType::Q4K,
        false,
        &bytes,
        1,
        256,
        &mut got
    ));
    for s in 0..8 {
        let want = f16(0) * f32::from(scales[s]) - f16(2) * f32::from(mins[s]);
        assert!(
            (got[32 * s + 5] - want).abs() <= 1e-6 * (1.0 + want.abs()),
            "{s}"
        );
    }
    Ok(())
}

#[test]
fn every_instruction_set_equals_candle_and_the_dequantized_product_alone_and_batched() -> Result<()>
{
    for (format, k) in [
        // Widths that are not multiples of 256 (odd numbers of blocks too), and that are.
        (GgmlDType::Q8_0, 96),
        (GgmlDType::Q8_0, 2080),
        (GgmlDType::Q8_0, 512),
        (GgmlDType::Q4_0, 32),
        (GgmlDType::Q4_0, 320),
        (GgmlDType::Q4_0, 2560),
        (GgmlDType::Q5_0, 64),
        // An odd number of blocks: dequantized rows (candle's dot would assert).
        (GgmlDType::Q5_0, 96),
        // One to eight blocks of 256 per row (768: the bench shape's three).
        (GgmlDType::Q4K, 256),
        (GgmlDType::Q4K, 512),
        (GgmlDType::Q4K, 768),
        (GgmlDType::Q4K, 2048),
    ] {
        // Three pieces fused: widths that are not multiples of the four rows a kernel takes
        // at a time, and one of eight-row groups (interleaved with `vpdpbusd`).
        let pieces = quantized_pieces(format, k, &[37, 16, 6])?;
        let x = seeded(&[9, k], (k + 3) as u64)?;
        let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
        // By layout: candle's, and interleaved (Q4_0's sums differ between them).
        let mut simd_outputs = [Vec::new(), Vec::new()];
        for isa in Isa::supported() {
            for (layout, held) in forms(&pieces, isa)?.into_iter().enumerate() {
                let run = |x: &Tensor| -> Result<Vec<f32>> {
                    let y = qgemv_with(isa, x, &held)?
                        .ok_or_else(|| crate::Error::Input("the kernel must apply".into()))?;
                    assert_eq!(y.dims(), &[x.dims()[0], 59]);
                    Ok(y.flatten_all()?.to_vec1()?)
                };
                let alone = (0..9)
                    .map(|r| run(&x.narrow(0, r, 1)?))
                    .collect::<Result<Vec<_>>>()?;
                // One to nine input rows: every row gets its bits alone.
                for rows in 1..=9 {
                    let got = run(&x.narrow(0, 0, rows)?)?;
                    for (r, alone) in alone.iter().enumerate().take(rows) {
                        let mine = &got[r * 59..(r + 1) * 59];
                        assert_eq!(bits(mine), bits(alone), "{isa:?} {format:?} {rows} rows");
                    }
                }
                let all = alone.concat();
                check_against_references(format, isa, &xs, &pieces, &held, 9, &all)?;
                if isa.level() != Level::Portable {
                    simd_outputs[layout].push(bits(&all));
                }
            }
        }
        // AVX2 and AVX-512 (with or without VNNI) sum the same i32 lanes exactly (Q8_0 and
        // interleaved Q4_0: whole blocks), then scale and add them alike: the same bits.
        for outputs in &simd_outputs {
            assert!(outputs.windows(2).all(|p| p[0] == p[1]), "{format:?} k {k}");
        }
    }
    Ok(())
}

/// Q8_0 and Q4_0 batches past one group of 16 lanes (and up to the 64 rows a decode step
/// takes): every row gets its bits alone, and on every instruction set its reference's.
#[test]
fn batches_of_many_groups_give_each_row_its_bits_alone() -> Result<()> {
    for (format, width, k) in [
        (GgmlDType::Q8_0, 21, 288),
        (GgmlDType::Q8_0, 24, 288),
        (GgmlDType::Q4_0, 24, 288),
        (GgmlDType::Q4K, 24, 512),
    ] {
        let pieces = quantized_pieces(format, k, &[width])?;
        let x = seeded(&[64, k], 5)?;
        let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
        for isa in Isa::supported() {
            for held in forms(&pieces, isa)? {
                let run = |x: &Tensor| -> Result<Vec<f32>> {
                    let y = qgemv_with(isa, x, &held)?
                        .ok_or_else(|| crate::Error::Input("the kernel must apply".into()))?;
                    Ok(y.flatten_all()?.to_vec1()?)
                };
                let all = run(&x)?;
                for rows in [17, 33, 64] {
                    let got = run(&x.narrow(0, 0, rows)?)?;
                    assert_eq!(bits(&got), bits(&all[..rows * width]), "{isa:?} {rows}");
                }
                for r in [0, 15, 16, 40, 63] {
                    let alone = run(&x.narrow(0, r, 1)?)?;
                    assert_eq!(
                        bits(&alone),
                        bits(&all[r * width..(r + 1) * width]),
                        "{isa:?} row {r}"
                    );
                }
                check_against_references(format, isa, &xs, &pieces, &held, 64, &all)?;
            }
        }
    }
    Ok(())
}

#[test]
fn many_bands_over_the_threads_equal_candle() -> Result<()> {
    // Widths of many bands (and not a multiple of four rows), one and three input rows.
    for (format, k) in [
        (GgmlDType::Q8_0, 256),
        (GgmlDType::Q4_0, 256),
        (GgmlDType::Q4K, 256),
    ] {
        let pieces = quantized_pieces(format, k, &[4097, 4096, 3])?;
        for isa in Isa::supported() {
            for held in forms(&pieces, isa)? {
                for rows in [1, 3] {
                    let x = seeded(&[rows, k], rows as u64)?;
                    let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
                    let y = qgemv_with(isa, &x, &held)?
                        .ok_or_else(|| crate::Error::Input("the kernel must apply".into()))?;
                    let got: Vec<f32> = y.flatten_all()?.to_vec1()?;
                    check_against_references(format, isa, &xs, &pieces, &held, rows, &got)?;
                }
            }
        }
    }
    Ok(())
}

/// A fixed amount of decode work for timing whole processes, old binary against new:
/// `cargo test --release --lib decode_projection_throughput -- --ignored --nocapture`
/// (`YOCO_CPU_ISA` picks the kernels, `YOCO_BENCH_FORMAT=q4_0` one format,
/// `YOCO_BENCH_ROWS=16` a step of 16 sequences). Prints GB/s of weights read and the time
/// per block and input row.
#[test]
#[ignore]
fn decode_projection_throughput() -> Result<()> {
    let var = |name: &str, default: usize| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    // Rows, copies cycled through (1 GB by default: from memory) and calls.
    let (k, n) = (2560, var("YOCO_BENCH_N", 10240));
    let (copies, calls) = (var("YOCO_BENCH_COPIES", 40), var("YOCO_BENCH_CALLS", 300));
    let only = std::env::var("YOCO_BENCH_FORMAT").unwrap_or_default();
    for (name, format) in [
        ("q8_0", GgmlDType::Q8_0),
        ("q4_0", GgmlDType::Q4_0),
        ("q4_k", GgmlDType::Q4K),
    ] {
        if !only.is_empty() && only != name {
            continue;
        }
        let q = quantized_pieces(format, k, &[256])?.remove(0);
        let src = q.data()?;
        let copies = (0..copies)
            .map(|_| {
                let mut bytes = Vec::with_capacity(src.len() * n / 256);
                for _ in 0..n / 256 {
                    bytes.extend_from_slice(&src);
                }
                let storage = candle_core::quantized::QStorage::from_data(
                    std::borrow::Cow::Owned(bytes),
                    &Device::Cpu,
                    format,
                )?;
                let q = Arc::new(QTensor::new(storage, (n, k))?);
                Ok(Arc::new(QWeight::prepared(q, Isa::active())?))
            })
            .collect::<Result<Vec<_>>>()?;
        // A decode step of `rows` sequences.
        let rows = var("YOCO_BENCH_ROWS", 1);
        let x = seeded(&[rows, 1, k], 1)?;
        let t0 = std::time::Instant::now();
        for c in 0..calls {
            qgemv_cpu(&x, std::slice::from_ref(&copies[c % copies.len()]))?;
        }
        let secs = t0.elapsed().as_secs_f64();
        let bytes = src.len() * n / 256 * calls;
        println!(
            "{format:?} {:?}, {rows} rows: {:.2} GB/s of weights, {:.2} ns per block and row",
            Isa::active(),
            bytes as f64 / secs / 1e9,
            secs * 1e9 / (calls * rows * n * k / format.block_size()) as f64
        );
    }
    Ok(())
}

/// A prompt chunk of Q8_0 or Q4_0 weights interleaved, with `vpdpbusd`, goes through the
/// decode kernel: every row gets the bits it gets alone in a decode step, the definition's
/// (exact block sums), whatever the chunk's length.
#[test]
fn a_prompt_chunk_of_interleaved_weights_gets_the_bits_of_a_decode_step() -> Result<()> {
    for (format, k) in [
        (GgmlDType::Q8_0, 320),
        (GgmlDType::Q4_0, 320),
        (GgmlDType::Q4K, 512),
    ] {
        a_prompt_chunk_gets_the_bits_of_a_decode_step(format, k)?;
    }
    Ok(())
}

fn a_prompt_chunk_gets_the_bits_of_a_decode_step(format: GgmlDType, k: usize) -> Result<()> {
    let isa = Isa::active();
    let m = 70;
    let pieces = quantized_pieces(format, k, &[48, 16])?;
    let held = pieces
        .iter()
        .map(|q| QWeight::prepared(q.clone(), isa).map(Arc::new))
        .collect::<Result<Vec<_>>>()?;
    if !held
        .iter()
        .all(|q| q.interleaved() && integer_prompts(isa, q.dtype()))
    {
        // Prompts of these weights dequantize here (the test above).
        return Ok(());
    }
    let x = seeded(&[m, k], 9)?;
    let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
    let got = prefill_product_cpu(&xs, m, &held)?
        .ok_or_else(|| crate::Error::Input("the interleaved chunk declined".into()))?;
    for r in [0, 1, 15, 16, 17, 69] {
        let alone = qgemv_with(isa, &x.narrow(0, r, 1)?, &held)?
            .ok_or_else(|| crate::Error::Input("the kernel must apply".into()))?;
        let alone: Vec<f32> = alone.flatten_all()?.to_vec1()?;
        assert_eq!(bits(&got[r * 64..(r + 1) * 64]), bits(&alone), "row {r}");
    }
    let shorter = prefill_product_cpu(&xs[..33 * k], 33, &held)?
        .ok_or_else(|| crate::Error::Input("the interleaved chunk declined".into()))?;
    assert_eq!(bits(&shorter), bits(&got[..33 * 64]));
    check_against_references(format, isa, &xs, &pieces, &held, m, &got)
}

/// The input's Q8_0 blocks are candle's `from_float`'s, byte for byte: values that round
/// half away from zero, blocks of zeros, tiny values whose inverse scale overflows, and
/// non-finite values.
#[cfg(target_arch = "x86_64")]
#[test]
fn the_inputs_q8_0_blocks_equal_candles() -> Result<()> {
    use candle_core::quantized::k_quants::BlockQ8_0;
    if Isa::cpu().level() < crate::kernels::isa::Level::Avx2 {
        return Ok(());
    }
    let mut xs: Vec<f32> = seeded(&[1, 32 * 64], 5)?.flatten_all()?.to_vec1()?;
    // Block 1: the largest is 127, so the others are their own scaled values: halves.
    for (i, x) in xs[32..64].iter_mut().enumerate() {
        *x = if i == 0 { 127.0 } else { i as f32 - 15.5 };
    }
    xs[64..96].fill(0.0);
    xs[96..128].iter_mut().for_each(|x| *x *= 1e-38);
    xs[128] = f32::NAN;
    xs[160] = f32::INFINITY;
    xs[192] = f32::NEG_INFINITY;
    xs[200] = -0.0;
    let mut want = vec![BlockQ8_0::zeros(); 64];
    BlockQ8_0::from_float(&xs, &mut want);
    let mut got = vec![BlockQ8_0::zeros(); 64];
    x86::quantize_q8_0(&xs, &mut got);
    for (b, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(format!("{g:?}"), format!("{w:?}"), "block {b}");
    }
    Ok(())
}

/// The input's Q8_K blocks are candle's `from_float`'s, byte for byte: a block whose largest
/// magnitude comes twice with both signs (the first one sets the scale), values that round
/// half away from zero, blocks of zeros, tiny values, and non-finite values.
#[cfg(target_arch = "x86_64")]
#[test]
fn the_inputs_q8_k_blocks_equal_candles() -> Result<()> {
    use candle_core::quantized::k_quants::BlockQ8K;
    if Isa::cpu().level() < crate::kernels::isa::Level::Avx2 {
        return Ok(());
    }
    let mut xs: Vec<f32> = seeded(&[1, 256 * 8], 6)?.flatten_all()?.to_vec1()?;
    // Block 0: -2 before 2, so the scale is 127 / 2 and its sign follows the first.
    xs[17] = -2.0;
    xs[200] = 2.0;
    // Block 1: the largest is -127 (the inverse scale 1), so the others round as themselves:
    // halves.
    for (i, x) in xs[256..512].iter_mut().enumerate() {
        *x = if i == 3 {
            -127.0
        } else {
            (i % 200) as f32 * 0.5 - 50.25
        };
    }
    xs[512..768].fill(0.0);
    xs[768..1024].iter_mut().for_each(|x| *x *= 1e-38);
    xs[1024] = f32::NAN;
    xs[1300] = f32::INFINITY;
    xs[1600] = f32::NEG_INFINITY;
    xs[1601] = -0.0;
    xs[1800..2048].fill(f32::NAN);
    let mut want = vec![BlockQ8K::zeros(); 8];
    BlockQ8K::from_float(&xs, &mut want);
    let mut got = vec![BlockQ8K::zeros(); 8];
    x86::quantize_q8k(&xs, &mut got);
    for (b, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(format!("{g:?}"), format!("{w:?}"), "block {b}");
    }
    Ok(())
}

/// The weights a prompt chunk multiplies are candle's `to_float`'s, bit for bit, on every
/// instruction set (the vectorised forms of Q8_0, Q4_0 and Q4_K, candle's for the rest),
/// over rows that span several of the parallel bands; blocks of the wrong length decline.
#[test]
fn dequantized_rows_equal_candles_on_every_instruction_set() -> Result<()> {
    for (format, n, k) in [
        (GgmlDType::Q8_0, 104, 32 * 70),
        (GgmlDType::Q4_0, 88, 32 * 75),
        (GgmlDType::Q4K, 80, 256 * 9),
        (GgmlDType::Q6K, 3, 256),
    ] {
        let q = QTensor::quantize(&seeded(&[n, k], k as u64)?, format)?;
        let want: Vec<f32> = q.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1()?;
        let data = q.data()?;
        for isa in Isa::supported() {
            let mut got = vec![f32::NAN; n * k];
            assert!(dequantize_into(isa, format, false, &data, n, k, &mut got));
            let same = got
                .iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{format:?} on {isa:?}");
            assert!(!dequantize_into(
                isa,
                format,
                false,
                &data[1..],
                n,
                k,
                &mut got
            ));
            // Rows interleaved by eight, as the kernels with AVX2 hold Q8_0 and Q4_0.
            if let Some(mixed) = interleave(format, &data, n, k) {
                let mut got = vec![f32::NAN; n * k];
                assert!(dequantize_into(isa, format, true, &mixed, n, k, &mut got));
                assert!(got == want, "interleaved on {isa:?}");
            }
        }
    }
    Ok(())
}

/// A prompt chunk's product gives what dequantizing the whole weight and calling candle's
/// matmul gives, bit for bit, for every format, whatever the buffer the thread reuses held
/// before (a larger weight, then a smaller one, then one of another width); fused pieces
/// (of different formats) give the product with their dequantized rows stacked.
#[test]
fn the_prefill_product_equals_dequantizing_and_matmul() -> Result<()> {
    type Pieces<'a> = &'a [(GgmlDType, usize)];
    let cases: [(Pieces, usize, usize); 6] = [
        (&[(GgmlDType::Q8_0, 300)], 96, 17),
        (&[(GgmlDType::Q4_0, 40)], 64, 130),
        (&[(GgmlDType::Q4K, 70)], 512, 9),
        (&[(GgmlDType::Q5_0, 33)], 160, 64),
        (&[(GgmlDType::Q6K, 12)], 256, 1),
        (
            &[
                (GgmlDType::Q8_0, 24),
                (GgmlDType::Q4K, 9),
                (GgmlDType::Q8_0, 5),
            ],
            256,
            33,
        ),
    ];
    for (pieces, k, m) in cases {
        let qs = pieces
            .iter()
            .enumerate()
            .map(|(i, &(format, n))| {
                Ok(Arc::new(QTensor::quantize(
                    &seeded(&[n, k], (k + i) as u64)?,
                    format,
                )?))
            })
            .collect::<Result<Vec<_>>>()?;
        let x = seeded(&[m, k], 7)?;
        let stacked = qs
            .iter()
            .map(|q| Ok(q.dequantize(&Device::Cpu)?))
            .collect::<Result<Vec<_>>>()?;
        let want = x.matmul(&Tensor::cat(&stacked, 0)?.t()?)?;
        let want: Vec<f32> = want.flatten_all()?.to_vec1()?;
        let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
        for held in forms(&qs, Isa::active())? {
            let isa = Isa::active();
            if held
                .iter()
                .all(|q| q.interleaved() && integer_prompts(isa, q.dtype()))
            {
                // The decode kernel's product (the test above).
                continue;
            }
            let got = prefill_product_cpu(&xs, m, &held)?
                .ok_or_else(|| crate::Error::Input(format!("{pieces:?} declined")))?;
            assert!(got == want, "{pieces:?} x {k}, {m} rows");
        }
    }
    let q = Arc::new(QWeight::Blocks(Arc::new(QTensor::quantize(
        &seeded(&[4, 32], 1)?,
        GgmlDType::Q8_0,
    )?)));
    assert!(prefill_product_cpu(&[0.0; 5], 1, std::slice::from_ref(&q)).is_err());
    // Pieces of different input widths are not one weight.
    let other = Arc::new(QWeight::Blocks(Arc::new(QTensor::quantize(
        &seeded(&[4, 64], 1)?,
        GgmlDType::Q8_0,
    )?)));
    assert!(prefill_product_cpu(&[0.0; 64], 1, &[q, other])?.is_none());
    Ok(())
}

#[test]
fn other_cases_decline() -> Result<()> {
    let q = Arc::new(QTensor::quantize(&seeded(&[8, 64], 1)?, GgmlDType::Q8_0)?);
    let q = Arc::new(QWeight::prepared(q, Isa::active())?);
    // Too many rows, the wrong width, another dtype: the caller's general path.
    // A decode step of many sequences takes the kernel; a prompt chunk of as many rows
    // does not.
    let step = seeded(&[GEMV_MAX_ROWS, 1, 64], 2)?;
    assert!(qgemv_cpu(&step, std::slice::from_ref(&q))?.is_some());
    let too_many = seeded(&[GEMV_MAX_ROWS + 1, 1, 64], 2)?;
    assert!(qgemv_cpu(&too_many, std::slice::from_ref(&q))?.is_none());
    let prompt = seeded(&[1, PROMPT_MAX_ROWS + 1, 64], 2)?;
    assert!(qgemv_cpu(&prompt, std::slice::from_ref(&q))?.is_none());
    assert!(qgemv_cpu(&seeded(&[1, 32], 2)?, std::slice::from_ref(&q))?.is_none());
    let half = seeded(&[1, 64], 2)?.to_dtype(DType::F16)?;
    assert!(qgemv_cpu(&half, &[q])?.is_none());
    // The Q4_K kernel: taken for interleaved rows wherever the CPU has its instructions,
    // and declined for candle's layout and for blocks or inputs that do not fit (the
    // caller then takes candle's dot products).
    #[cfg(target_arch = "x86_64")]
    {
        let q = QTensor::quantize(&seeded(&[6, 512], 3)?, GgmlDType::Q4K)?;
        let bytes = q.data()?;
        let mixed = interleave(GgmlDType::Q4K, &bytes, 6, 512)
            .ok_or_else(|| crate::Error::Input("6 rows interleave".into()))?;
        let x: Vec<f32> = seeded(&[2, 512], 4)?.flatten_all()?.to_vec1()?;
        let cpu = is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c");
        let isa = Isa::cpu();
        let kernel = |isa, mixed, bytes: &[u8], n, k, x: &[f32], rows| {
            x86::q4k_kernel(isa, mixed, bytes, n, k, x, rows).is_some()
        };
        assert_eq!(kernel(isa, true, &mixed, 6, 512, &x, 2), cpu);
        assert!(!kernel(isa, false, &bytes, 6, 512, &x, 2));
        let portable = isa.at_most(crate::kernels::isa::Level::Portable);
        assert!(!kernel(portable, true, &mixed, 6, 512, &x, 2));
        assert!(!kernel(isa, true, &mixed, 9, 512, &x, 2));
        assert!(!kernel(isa, true, &mixed, 8, 384, &x[..768], 2));
        assert!(!kernel(isa, true, &mixed, 6, 512, &x[..500], 1));
        assert!(!kernel(isa, true, &mixed[1..], 6, 512, &x, 2));
    }
    Ok(())
}
