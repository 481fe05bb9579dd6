//! Logits against an independent NumPy reference written from the spec (tools/reference.py,
//! fixtures made by tools/make_fixtures.py).

mod common;

use candle_core::{DType, Device, Tensor};
use common::{expected, fixture, ids, max_abs_diff};
use yoco::Model;

/// f32 rounding over a few layers; the traps miss by more than 1.
const TOL: f32 = 1e-4;

fn check_full_forward(folder: &str, expected_folder: &str) {
    let model = Model::load(fixture(folder), &Device::Cpu, DType::F32).unwrap();
    let exp = expected(expected_folder);
    let mut cache = model.new_cache(1).unwrap();
    let logits = model
        .forward(&ids(&exp.tokens), &mut cache)
        .unwrap()
        .squeeze(0)
        .unwrap();
    let diff = max_abs_diff(&logits, &exp.logits);
    assert!(diff <= TOL, "{folder}: max |logits - reference| = {diff}");
    // The same comparison must reject the spec's two RoPE traps.
    let trap_a = max_abs_diff(&logits, &exp.halfsplit);
    let trap_b = max_abs_diff(&logits, &exp.standard_freqs);
    assert!(
        trap_a > 100.0 * TOL && trap_b > 100.0 * TOL,
        "{folder}: traps {trap_a} {trap_b}"
    );
}

#[test]
fn gated_retention_matches_reference() {
    check_full_forward("gret", "gret");
}

#[test]
fn sliding_window_matches_reference() {
    check_full_forward("swa", "swa");
}

#[test]
fn long_theta_and_positions_beyond_500_match_reference() {
    check_full_forward("gret_long_theta", "gret_long_theta");
}

#[test]
fn sharded_safetensors_match_reference() {
    check_full_forward("gret_sharded", "gret");
}

#[test]
fn torch_checkpoint_with_trainer_prefix_matches_reference() {
    check_full_forward("gret_pth", "gret");
}

/// Prefill `split` tokens in chunks of `chunk`, then `step` the rest: every logit row must equal
/// the reference's full forward at that position.
fn check_prefill_then_step(folder: &str, split: usize, chunk: usize) {
    let model = Model::load(fixture(folder), &Device::Cpu, DType::F32).unwrap();
    let exp = expected(folder);
    let n = exp.tokens.len().min(split + 24);
    let mut cache = model.new_cache(1).unwrap();
    let last = model
        .prefill_chunked(&ids(&exp.tokens[..split]), &mut cache, chunk)
        .unwrap();
    let want = exp.logits.narrow(0, split - 1, 1).unwrap();
    let diff = max_abs_diff(&last, &want);
    assert!(
        diff <= TOL,
        "{folder} prefill {split} chunk {chunk}: {diff}"
    );
    for pos in split..n {
        let logits = model
            .step(
                &Tensor::new(&[exp.tokens[pos]], &Device::Cpu).unwrap(),
                &mut cache,
            )
            .unwrap();
        let diff = max_abs_diff(&logits, &exp.logits.narrow(0, pos, 1).unwrap());
        assert!(
            diff <= TOL,
            "{folder} step at {pos} after prefill {split}/{chunk}: {diff}"
        );
    }
    assert_eq!(cache.positions(), &[n]);
}

#[test]
fn gret_prefill_in_chunks_then_steps_equals_full_forward() {
    for (split, chunk) in [
        (1, 1),
        (5, 2),
        (100, 7),
        (260, 64),
        (276, 256),
        (270, 100),
        (200, 512),
    ] {
        check_prefill_then_step("gret", split, chunk);
    }
}

#[test]
fn swa_prefill_in_chunks_then_steps_equals_full_forward() {
    // Window 32: chunks smaller than, equal to and larger than the window, not dividing the prompt.
    for (split, chunk) in [
        (1, 1),
        (40, 3),
        (100, 31),
        (150, 32),
        (276, 33),
        (250, 100),
        (270, 512),
    ] {
        check_prefill_then_step("swa", split, chunk);
    }
}

#[test]
fn stepping_every_token_from_the_start_equals_full_forward() {
    for folder in ["gret", "swa"] {
        let model = Model::load(fixture(folder), &Device::Cpu, DType::F32).unwrap();
        let exp = expected(folder);
        let mut cache = model.new_cache(1).unwrap();
        for (pos, &tok) in exp.tokens.iter().enumerate().take(80) {
            let logits = model
                .step(&Tensor::new(&[tok], &Device::Cpu).unwrap(), &mut cache)
                .unwrap();
            let diff = max_abs_diff(&logits, &exp.logits.narrow(0, pos, 1).unwrap());
            assert!(diff <= TOL, "{folder} step {pos}: {diff}");
        }
    }
}

#[test]
fn batch_of_two_equal_length_rows_matches_each_row_alone() {
    let model = Model::load(fixture("gret"), &Device::Cpu, DType::F32).unwrap();
    let exp = expected("gret");
    let a = &exp.tokens[..90];
    let b: Vec<u32> = exp.tokens[100..190].to_vec();
    let both = Tensor::cat(&[ids(a), ids(&b)], 0).unwrap();
    let mut cache = model.new_cache(2).unwrap();
    let logits = model.forward(&both, &mut cache).unwrap();
    for (row, toks) in [(0, a.to_vec()), (1, b)] {
        let mut c1 = model.new_cache(1).unwrap();
        let alone = model.forward(&ids(&toks), &mut c1).unwrap();
        let diff = max_abs_diff(&logits.narrow(0, row, 1).unwrap(), &alone);
        assert!(diff <= 1e-5, "row {row}: {diff}");
    }
    // Row 0 is the fixture's own prefix: it must also match the reference.
    let diff = max_abs_diff(
        &logits.narrow(0, 0, 1).unwrap().squeeze(0).unwrap(),
        &exp.logits.narrow(0, 0, 90).unwrap(),
    );
    assert!(diff <= TOL, "{diff}");
}

/// A scoring forward over more than two chunks (the cross-decoder then reads the global K/V in
/// several blocks, merged by an online softmax) equals stepping token by token (one block), for
/// both self-decoders.
#[test]
fn forward_over_several_chunks_equals_stepping_every_token() {
    for folder in ["gret", "swa"] {
        let model = Model::load(fixture(folder), &Device::Cpu, DType::F32).unwrap();
        let base = expected(folder).tokens;
        let tokens: Vec<u32> = (0..1100).map(|i| base[(i * 7) % base.len()]).collect();
        let mut cache = model.new_cache(1).unwrap();
        let all = model
            .forward(&ids(&tokens), &mut cache)
            .unwrap()
            .squeeze(0)
            .unwrap();
        let mut stepped = model.new_cache(1).unwrap();
        for (pos, &tok) in tokens.iter().enumerate() {
            let logits = model
                .step(&Tensor::new(&[tok], &Device::Cpu).unwrap(), &mut stepped)
                .unwrap();
            if pos % 37 == 0 || pos >= 1020 {
                let diff = max_abs_diff(&logits, &all.narrow(0, pos, 1).unwrap());
                assert!(diff <= TOL, "{folder} position {pos}: {diff}");
            }
        }
    }
}
