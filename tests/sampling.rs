//! Behaviour of `yoco::sampling` through its public API.

use yoco::Error;
use yoco::{Rng, Sampler, Sampling};

fn settings(temperature: f32) -> Sampling {
    Sampling {
        temperature,
        top_k: None,
        top_p: None,
        min_p: None,
        repetition_penalty: 1.0,
        repetition_window: 64,
    }
}

fn sampler(s: Sampling, seed: u64) -> Sampler {
    Sampler::new(s, seed, Vec::new()).unwrap()
}

/// Continuous random logits in [-10, 10): ties are practically impossible.
fn random_row(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.next_f32() * 20.0 - 10.0).collect()
}

/// Integer logits in a narrow range: many ties, to check tie-breaking by lowest id.
fn tied_row(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| (rng.next_f32() * 4.0).floor()).collect()
}

fn greedy_pick(row: &[f32], history: &[u32]) -> u32 {
    let mut g = sampler(Sampling::greedy(), 0);
    g.sample(&mut row.to_vec(), history).unwrap()
}

fn softmax(logits: &[f32], temperature: f64) -> Vec<f64> {
    let max = logits
        .iter()
        .fold(f64::NEG_INFINITY, |m, &l| m.max(l as f64));
    let e: Vec<f64> = logits
        .iter()
        .map(|&l| ((l as f64 - max) / temperature).exp())
        .collect();
    let sum: f64 = e.iter().sum();
    e.iter().map(|x| x / sum).collect()
}

fn frequencies(s: &mut Sampler, row: &[f32], n: usize) -> Vec<f64> {
    let mut counts = vec![0usize; row.len()];
    for _ in 0..n {
        let id = s.sample(&mut row.to_vec(), &[]).unwrap();
        counts[id as usize] += 1;
    }
    counts.iter().map(|&c| c as f64 / n as f64).collect()
}

/// Each frequency within 4.5 standard errors of its probability (and exactly 0 where the
/// probability is 0).
fn assert_matches(freq: &[f64], probs: &[f64], n: usize) {
    for (i, (&f, &p)) in freq.iter().zip(probs).enumerate() {
        let se = (p * (1.0 - p) / n as f64).sqrt();
        if p == 0.0 {
            assert_eq!(f, 0.0, "token {i} has probability 0 but was drawn");
        } else {
            assert!(
                (f - p).abs() <= 4.5 * se,
                "token {i}: frequency {f:.4}, probability {p:.4} (se {se:.4}); all {freq:?} vs {probs:?}"
            );
        }
    }
}

#[test]
fn default_is_valid_and_not_greedy() {
    let d = Sampling::default();
    d.validate().unwrap();
    assert!(!d.is_greedy());
    assert_eq!(d.temperature, 0.8);
    assert_eq!(d.top_p, Some(0.95));
    assert_eq!(d.repetition_penalty, 1.0);
    assert_eq!(d.repetition_window, 64);
    let g = Sampling::greedy();
    g.validate().unwrap();
    assert!(g.is_greedy());
}

#[test]
fn top_k_1_equals_greedy() {
    let mut rng = Rng::new(11);
    let mut s = sampler(
        Sampling {
            top_k: Some(1),
            ..settings(1.0)
        },
        5,
    );
    for i in 0..300 {
        let row = if i % 2 == 0 {
            random_row(&mut rng, 1000)
        } else {
            tied_row(&mut rng, 1000)
        };
        assert_eq!(
            s.sample(&mut row.clone(), &[]).unwrap(),
            greedy_pick(&row, &[])
        );
    }
}

#[test]
fn tiny_top_p_equals_greedy() {
    let mut rng = Rng::new(12);
    let mut s = sampler(
        Sampling {
            top_p: Some(1e-6),
            ..settings(1.0)
        },
        6,
    );
    for i in 0..300 {
        let row = if i % 2 == 0 {
            random_row(&mut rng, 1000)
        } else {
            tied_row(&mut rng, 1000)
        };
        assert_eq!(
            s.sample(&mut row.clone(), &[]).unwrap(),
            greedy_pick(&row, &[])
        );
    }
}

#[test]
fn min_p_1_equals_greedy_without_ties() {
    let mut rng = Rng::new(13);
    let mut s = sampler(
        Sampling {
            min_p: Some(1.0),
            ..settings(1.5)
        },
        7,
    );
    for _ in 0..300 {
        let row = random_row(&mut rng, 1000);
        assert_eq!(
            s.sample(&mut row.clone(), &[]).unwrap(),
            greedy_pick(&row, &[])
        );
    }
}

#[test]
fn min_p_drops_unlikely_tokens_and_renormalises() {
    // Probabilities 0.5, 0.3, 0.2: min_p 0.5 keeps tokens with p >= 0.25, i.e. 0 and 1.
    let row: Vec<f32> = [0.5f32, 0.3, 0.2].iter().map(|p| p.ln()).collect();
    let mut s = sampler(
        Sampling {
            min_p: Some(0.5),
            ..settings(1.0)
        },
        8,
    );
    let n = 20_000;
    let freq = frequencies(&mut s, &row, n);
    assert_matches(&freq, &[0.625, 0.375, 0.0], n);
}

#[test]
fn top_p_keeps_smallest_nucleus_and_renormalises() {
    // 0.5 < 0.7 <= 0.5 + 0.3: the nucleus is tokens 0 and 1.
    let row: Vec<f32> = [0.2f32, 0.5, 0.3].iter().map(|p| p.ln()).collect();
    let mut s = sampler(
        Sampling {
            top_p: Some(0.7),
            ..settings(1.0)
        },
        9,
    );
    let n = 20_000;
    let freq = frequencies(&mut s, &row, n);
    assert_matches(&freq, &[0.0, 0.625, 0.375], n);
}

#[test]
fn same_seed_same_draws_different_seed_different_draws() {
    let row = vec![0.0f32; 1000];
    let draws = |seed| {
        let mut s = sampler(settings(1.0), seed);
        (0..50)
            .map(|_| s.sample(&mut row.clone(), &[]).unwrap())
            .collect::<Vec<u32>>()
    };
    assert_eq!(draws(1), draws(1));
    assert_ne!(draws(1), draws(2));
    // Clones continue the same stream.
    let mut a = sampler(Sampling::default(), 99);
    a.sample(&mut row.clone(), &[]).unwrap();
    let mut b = a.clone();
    for _ in 0..20 {
        assert_eq!(
            a.sample(&mut row.clone(), &[]).unwrap(),
            b.sample(&mut row.clone(), &[]).unwrap()
        );
    }

    let mut r1 = Rng::new(5);
    let mut r2 = Rng::new(5);
    let mut r3 = Rng::new(6);
    let s1: Vec<u64> = (0..10).map(|_| r1.next_u64()).collect();
    let s2: Vec<u64> = (0..10).map(|_| r2.next_u64()).collect();
    let s3: Vec<u64> = (0..10).map(|_| r3.next_u64()).collect();
    assert_eq!(s1, s2);
    assert_ne!(s1, s3);
}

#[test]
fn greedy_draws_no_random_number() {
    // The Debug output shows the RNG state: greedy steps must leave it untouched, so that a
    // later stochastic step draws what a fresh sampler with that seed would.
    let row: Vec<f32> = (0..100).map(|i| (i % 7) as f32).collect();
    let mut g = sampler(Sampling::greedy(), 3);
    let before = format!("{g:?}");
    for _ in 0..10 {
        assert_eq!(g.sample(&mut row.clone(), &[]).unwrap(), 6);
    }
    assert_eq!(format!("{g:?}"), before);
    // And the Debug output does change when a number is drawn (so the check above can fail).
    let mut t = sampler(settings(1.0), 3);
    let before = format!("{t:?}");
    t.sample(&mut row.clone(), &[]).unwrap();
    assert_ne!(format!("{t:?}"), before);
}

#[test]
fn frequencies_match_softmax_at_temperature_1() {
    let row = [1.0f32, 2.0, 0.5, -1.0, 3.0, 0.0];
    let n = 20_000;
    let mut s = sampler(settings(1.0), 2024);
    let freq = frequencies(&mut s, &row, n);
    assert_matches(&freq, &softmax(&row, 1.0), n);
}

#[test]
fn frequencies_match_softmax_at_temperature_2() {
    let row = [1.0f32, 2.0, 0.5, -1.0, 3.0, 0.0];
    let n = 20_000;
    let mut s = sampler(settings(2.0), 77);
    let freq = frequencies(&mut s, &row, n);
    assert_matches(&freq, &softmax(&row, 2.0), n);
}

#[test]
fn frequencies_match_softmax_on_large_vocab() {
    // Exercises the partial-sort path (more candidates than one partial prefix holds).
    let mut rng = Rng::new(31);
    let row: Vec<f32> = (0..3000).map(|_| rng.next_f32() * 2.0).collect();
    let mut row = row;
    row[0] = 6.0;
    row[1] = 5.0;
    let n = 20_000;
    let mut s = sampler(settings(1.0), 4);
    let freq = frequencies(&mut s, &row, n);
    let probs = softmax(&row, 1.0);
    assert_matches(&freq[..2], &probs[..2], n);
    let rest: f64 = freq[2..].iter().sum();
    let rest_p: f64 = probs[2..].iter().sum();
    assert_matches(&[rest], &[rest_p], n);
}

#[test]
fn top_k_2_never_leaves_the_top_2() {
    let mut rng = Rng::new(21);
    let mut s = sampler(
        Sampling {
            top_k: Some(2),
            ..settings(5.0) // hot, so that without top-k other tokens would show up
        },
        22,
    );
    let mut seen_second = false;
    for _ in 0..500 {
        let row = random_row(&mut rng, 50);
        let mut order: Vec<usize> = (0..row.len()).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
        let id = s.sample(&mut row.clone(), &[]).unwrap() as usize;
        assert!(
            id == order[0] || id == order[1],
            "picked rank outside top 2"
        );
        seen_second |= id == order[1];
    }
    assert!(seen_second, "top-k 2 behaved like greedy");
}

#[test]
fn top_k_2_frequencies_are_renormalised() {
    let row = [0.0f32, 1.0, 0.5, -2.0];
    let n = 20_000;
    let mut s = sampler(
        Sampling {
            top_k: Some(2),
            ..settings(1.0)
        },
        23,
    );
    let freq = frequencies(&mut s, &row, n);
    let p1 = 1.0 / (1.0 + (-0.5f64).exp());
    assert_matches(&freq, &[0.0, p1, 1.0 - p1, 0.0], n);
}

#[test]
fn repetition_penalty_divides_positive_logits() {
    let row = [2.0f32, 1.9, 0.0];
    assert_eq!(greedy_pick(&row, &[0]), 0);
    let mut s = sampler(
        Sampling {
            repetition_penalty: 1.3,
            ..Sampling::greedy()
        },
        0,
    );
    assert_eq!(s.sample(&mut row.to_vec(), &[0]).unwrap(), 1);
    // The row is scratch: the penalised logit is visible.
    let mut scratch = row.to_vec();
    s.sample(&mut scratch, &[0]).unwrap();
    assert!((scratch[0] - 2.0 / 1.3).abs() < 1e-6);
    assert_eq!(scratch[1], 1.9);
}

#[test]
fn repetition_penalty_multiplies_negative_logits() {
    // Dividing -1 by 2 would give -0.5 and token 0 would still win.
    let row = [-1.0f32, -1.5, -3.0];
    let mut s = sampler(
        Sampling {
            repetition_penalty: 2.0,
            ..Sampling::greedy()
        },
        0,
    );
    assert_eq!(s.sample(&mut row.to_vec(), &[0]).unwrap(), 1);
}

#[test]
fn repetition_penalty_counts_each_id_once_and_respects_window() {
    let mut s = sampler(
        Sampling {
            repetition_penalty: 2.0,
            repetition_window: 3,
            ..Sampling::greedy()
        },
        0,
    );
    // Once: 4 / 2 = 2 > 1.9. Three times would give 0.5.
    assert_eq!(s.sample(&mut [4.0, 1.9], &[0, 0, 0]).unwrap(), 0);
    // Token 0 fell out of the 3-token window...
    assert_eq!(s.sample(&mut [2.0, 1.9, 0.0], &[0, 2, 2, 2]).unwrap(), 0);
    // ...but not here: 2 / 2 = 1 < 1.9.
    assert_eq!(s.sample(&mut [2.0, 1.9, 0.0], &[1, 2, 0, 2]).unwrap(), 1);
    // Ids beyond the vocabulary are ignored.
    assert_eq!(s.sample(&mut [2.0, 1.9], &[7, 1_000_000]).unwrap(), 0);
}

#[test]
fn repetition_penalty_lowers_sampled_frequency() {
    let row = [1.0f32, 1.0];
    let n = 20_000;
    let mut s = sampler(
        Sampling {
            repetition_penalty: 2.0,
            ..settings(1.0)
        },
        41,
    );
    let mut count0 = 0usize;
    for _ in 0..n {
        if s.sample(&mut row.to_vec(), &[0]).unwrap() == 0 {
            count0 += 1;
        }
    }
    // Logits become 0.5 and 1.0.
    let p0 = 1.0 / (1.0 + 0.5f64.exp());
    assert_matches(&[count0 as f64 / n as f64], &[p0], n);
}

#[test]
fn suppressed_ids_are_never_chosen() {
    let mut rng = Rng::new(51);
    let suppress = vec![0u32, 1, 5, 999_999];
    let mut greedy = Sampler::new(Sampling::greedy(), 0, suppress.clone()).unwrap();
    let mut hot = Sampler::new(settings(10.0), 52, suppress).unwrap();
    for _ in 0..500 {
        let mut row = random_row(&mut rng, 8);
        row[0] = 100.0; // would win without suppression
        row[5] = 90.0;
        let g = greedy.sample(&mut row.clone(), &[]).unwrap();
        let h = hot.sample(&mut row.clone(), &[]).unwrap();
        for id in [g, h] {
            assert!(![0, 1, 5].contains(&id), "suppressed id {id} chosen");
        }
    }
}

#[test]
fn validate_rejects_each_bad_setting() {
    let cases: Vec<(Sampling, &str)> = vec![
        (settings(-1.0), "temperature"),
        (settings(f32::NAN), "temperature"),
        (settings(f32::INFINITY), "temperature"),
        (
            Sampling {
                top_p: Some(0.0),
                ..settings(1.0)
            },
            "top_p",
        ),
        (
            Sampling {
                top_p: Some(1.5),
                ..settings(1.0)
            },
            "top_p",
        ),
        (
            Sampling {
                top_p: Some(f32::NAN),
                ..settings(1.0)
            },
            "top_p",
        ),
        (
            Sampling {
                top_k: Some(0),
                ..settings(1.0)
            },
            "top_k",
        ),
        (
            Sampling {
                min_p: Some(2.0),
                ..settings(1.0)
            },
            "min_p",
        ),
        (
            Sampling {
                min_p: Some(-0.1),
                ..settings(1.0)
            },
            "min_p",
        ),
        (
            Sampling {
                min_p: Some(f32::NAN),
                ..settings(1.0)
            },
            "min_p",
        ),
        (
            Sampling {
                repetition_penalty: 0.0,
                ..settings(1.0)
            },
            "repetition_penalty",
        ),
        (
            Sampling {
                repetition_penalty: -1.0,
                ..settings(1.0)
            },
            "repetition_penalty",
        ),
        (
            Sampling {
                repetition_penalty: f32::INFINITY,
                ..settings(1.0)
            },
            "repetition_penalty",
        ),
    ];
    for (s, name) in cases {
        match s.validate() {
            Err(Error::Generation(msg)) => {
                assert!(msg.contains(name), "message {msg:?} does not name {name}")
            }
            other => panic!("{s:?}: expected Error::Generation, got {other:?}"),
        }
        assert!(matches!(
            Sampler::new(s, 0, Vec::new()),
            Err(Error::Generation(_))
        ));
    }
    // Boundaries that are allowed.
    for s in [
        Sampling {
            top_p: Some(1.0),
            min_p: Some(0.0),
            ..settings(0.0)
        },
        Sampling {
            min_p: Some(1.0),
            top_k: Some(1),
            ..settings(1e-3)
        },
    ] {
        s.validate().unwrap();
    }
}

#[test]
fn impossible_rows_are_errors() {
    for s in [Sampling::greedy(), settings(1.0), Sampling::default()] {
        let mut plain = sampler(s.clone(), 0);
        assert!(matches!(plain.sample(&mut [], &[]), Err(Error::Input(_))));
        assert!(matches!(
            plain.sample(&mut [f32::NAN; 4], &[]),
            Err(Error::Input(_))
        ));
        assert!(matches!(
            plain.sample(&mut [f32::NEG_INFINITY, f32::NAN], &[]),
            Err(Error::Input(_))
        ));
        let mut banned = Sampler::new(s, 0, vec![0, 1, 2]).unwrap();
        assert!(matches!(
            banned.sample(&mut [1.0, 2.0, 3.0], &[0, 1, 2]),
            Err(Error::Input(_))
        ));
    }
}

#[test]
fn nan_never_wins_and_inf_takes_all() {
    for s in [Sampling::greedy(), settings(1.0), settings(100.0)] {
        let mut x = sampler(s, 8);
        for _ in 0..100 {
            assert_eq!(x.sample(&mut [f32::NAN, 1.0, f32::NAN], &[]).unwrap(), 1);
            assert_eq!(x.sample(&mut [3.0, f32::INFINITY, 2.0], &[]).unwrap(), 1);
        }
    }
}

#[test]
fn tiny_temperature_does_not_overflow() {
    let mut s = sampler(settings(1e-30), 1);
    for _ in 0..20 {
        assert_eq!(s.sample(&mut [1e30, 2e30, -3e38, 0.0], &[]).unwrap(), 1);
    }
}

#[test]
fn hundred_k_vocab_with_defaults_and_top_k() {
    let mut rng = Rng::new(61);
    let row: Vec<f32> = (0..100_000).map(|_| rng.next_f32() * 30.0 - 15.0).collect();
    let mut with_k = sampler(
        Sampling {
            top_k: Some(40),
            ..Sampling::default()
        },
        3,
    );
    let mut default = sampler(Sampling::default(), 3);
    let mut order: Vec<u32> = (0..row.len() as u32).collect();
    order.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]));
    let top40: Vec<u32> = order[..40].to_vec();
    let start = std::time::Instant::now();
    for _ in 0..20 {
        let k = with_k.sample(&mut row.clone(), &[]).unwrap();
        assert!(top40.contains(&k));
        let d = default.sample(&mut row.clone(), &[]).unwrap();
        assert!((d as usize) < row.len());
    }
    eprintln!("40 draws on a 100K row: {:?}", start.elapsed());
}
