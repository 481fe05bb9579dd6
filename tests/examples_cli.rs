//! The examples' command lines: `--help` works and lists every documented flag, bad flags and
//! values are errors (never a silent default, never a file named like a flag), and the flags
//! reach what they set (checked against computations that do not go through the examples).
//!
//! The example binaries are the ones `cargo test` builds beside this test (in
//! `target/<profile>/examples/`); `cargo test --test examples_cli` alone does not rebuild them,
//! so run `cargo build --examples` (same profile) first in that case. Only tiny models run here.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device, D};
use yoco::{GenerationConfig, Model, Sampling, Tokenizer};

/// The path of example `name`, built for the same profile as this test.
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/examples_cli-<hash>  ->  target/<profile>/examples/<name>
    let profile_dir = exe.parent().and_then(Path::parent).unwrap();
    let path = profile_dir
        .join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.is_file(),
        "{} is missing: `cargo test` builds the examples; with `--test examples_cli` alone, run \
         `cargo build --examples` (same profile) first",
        path.display()
    );
    path
}

fn run_in(dir: &Path, name: &str, args: &[&str]) -> Output {
    Command::new(example(name))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

fn run(name: &str, args: &[&str]) -> Output {
    run_in(Path::new(env!("CARGO_MANIFEST_DIR")), name, args)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A fresh empty folder for one test.
fn scratch(test: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("examples_cli-{test}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Every example with the flags its documentation (README, docs/gpu.md, scripts) promises.
const DOCUMENTED: &[(&str, &[&str])] = &[
    (
        "generate",
        &[
            "--model",
            "--prompt",
            "--prompt-tokens",
            "--max-new-tokens",
            "--greedy",
            "--temperature",
            "--top-k",
            "--top-p",
            "--min-p",
            "--repeat-penalty",
            "--seed",
            "--device",
            "--dtype",
            "--quant",
            "--prefill-chunk",
            "--json",
        ],
    ),
    (
        "score",
        &[
            "--model",
            "--tokens-file",
            "--text-file",
            "--dump-logits",
            "--json",
            "--device",
            "--dtype",
            "--quant",
        ],
    ),
    (
        "profile",
        &[
            "--contexts",
            "--models",
            "--decode-steps",
            "--chunk",
            "--quant",
            "--out",
            "--limits",
        ],
    ),
    ("long_run", &["--tokens", "--every", "--window", "--quant"]),
    ("quantize", &["--model", "--quant", "--out"]),
    (
        "gpu_bench",
        &[
            "--contexts",
            "--llama-contexts",
            "--skip-llama",
            "--chunk",
            "--llama-chunk",
            "--decode-steps",
            "--bandwidth",
            "--time-budget-s",
            "--dtype",
            "--device",
            "--shape",
            "--json",
            "--markdown",
        ],
    ),
    ("make_reference_tokenizer", &["--out"]),
    (
        "serve",
        &[
            "--model",
            "--host",
            "--port",
            "--max-sequences",
            "--max-queue",
            "--max-prompt-tokens",
            "--max-tokens",
            "--prefill-chunk",
            "--prefix-cache-mb",
            "--device",
            "--dtype",
        ],
    ),
    (
        "load",
        &[
            "--model",
            "--shape",
            "--clients",
            "--prompt-tokens",
            "--new-tokens",
            "--prefill-chunk",
            "--json",
        ],
    ),
];

#[test]
fn help_exits_0_and_lists_every_documented_flag() {
    for (name, flags) in DOCUMENTED {
        for help in ["--help", "-h"] {
            let o = run(name, &[help]);
            assert!(o.status.success(), "{name} {help}: {:?}", o.status);
            let text = stdout(&o);
            assert!(text.contains("Usage:"), "{name} {help}:\n{text}");
            for flag in *flags {
                assert!(
                    text.contains(flag),
                    "{name} {help} does not list {flag}:\n{text}"
                );
            }
        }
    }
}

#[test]
fn unknown_flags_are_errors() {
    for (name, _) in DOCUMENTED {
        let o = run(name, &["--no-such-flag"]);
        assert_eq!(o.status.code(), Some(2), "{name}: {}", stderr(&o));
        assert!(
            stderr(&o).contains("--no-such-flag"),
            "{name}: {}",
            stderr(&o)
        );
        assert!(stdout(&o).is_empty(), "{name} printed {}", stdout(&o));
    }
}

#[test]
fn missing_and_malformed_values_are_errors() {
    let cases: &[(&str, &[&str], &str)] = &[
        ("long_run", &["--tokens", "10k"], "10k"),
        ("long_run", &["--every", "0"], "--every"),
        ("long_run", &["--tokens"], "--tokens"),
        ("generate", &["--seed", "x"], "--seed"),
        ("generate", &["--max-new-tokens"], "--max-new-tokens"),
        ("generate", &["--prompt-tokens", "1,x,3"], "`x`"),
        (
            "generate",
            &["--prompt", "a", "--prompt-tokens", "1"],
            "--prompt",
        ),
        (
            "generate",
            &["--greedy", "--temperature", "0.5"],
            "--greedy",
        ),
        ("generate", &["--dtype", "f8"], "f8"),
        ("score", &["--model", "m"], "--tokens-file"),
        (
            "score",
            &["--model", "m", "--tokens-file", "a", "--text-file", "b"],
            "--text-file",
        ),
        ("score", &["--tokens-file", "a"], "--model"),
        ("score", &["--device", "tpu"], "tpu"),
        ("profile", &["--contexts", "1024,abc"], "abc"),
        ("profile", &["--models", "yoco,gpt"], "gpt"),
        ("profile", &["--chunk", "0"], "--chunk"),
        ("gpu_bench", &["--decode-steps", "0"], "--decode-steps"),
        ("gpu_bench", &["--contexts", "4k,x"], "`x`"),
        ("gpu_bench", &["--shape", "7b"], "7b"),
        ("gpu_bench", &["--bandwidth", "0"], "--bandwidth"),
        ("generate", &["--quant", "q3_k"], "q3_k"),
        ("score", &["--quant"], "--quant"),
        ("profile", &["--quant", "none,q9"], "q9"),
        ("long_run", &["--quant", "f16"], "f16"),
        ("quantize", &["--model", "m", "--out", "o"], "--quant"),
        ("quantize", &["--model", "m", "--quant", "q8_0"], "--out"),
    ];
    for (name, args, mention) in cases {
        let o = run(name, args);
        assert_eq!(o.status.code(), Some(2), "{name} {args:?}: {}", stderr(&o));
        assert!(
            stderr(&o).contains(mention),
            "{name} {args:?}: the error does not mention {mention}:\n{}",
            stderr(&o)
        );
        assert!(
            stdout(&o).is_empty(),
            "{name} {args:?} printed {}",
            stdout(&o)
        );
    }
}

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_devices_go_through_the_library_parser() {
    // `cuda:N` is a device name everywhere; in a build without CUDA the library says why it
    // cannot open it (rather than an example's own "unknown device").
    for name in ["generate", "score", "gpu_bench"] {
        let o = run(name, &["--device", "cuda:1"]);
        assert_eq!(o.status.code(), Some(2), "{name}: {}", stderr(&o));
        assert!(
            stderr(&o).contains("--features cuda"),
            "{name}: {}",
            stderr(&o)
        );
    }
    // gpu_bench defaults to CUDA: without it, it says so and exits with 2 (docs/gpu.md).
    let o = run("gpu_bench", &[]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--features cuda"), "{}", stderr(&o));
}

#[test]
fn make_reference_tokenizer_never_writes_a_flag_as_a_file() {
    let dir = scratch("tokenizer");
    for args in [
        &["--help"][..],
        &["-h"],
        &["--out"],
        &["--out", "--help"],
        &["--out=-x"],
        &["--out", ""],
        &["tokenizer.json"],
    ] {
        let o = run_in(&dir, "make_reference_tokenizer", args);
        let written: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert!(written.is_empty(), "{args:?} wrote {written:?}");
        let help = args[0] == "--help" || args[0] == "-h";
        assert_eq!(o.status.success(), help, "{args:?}: {}", stderr(&o));
    }
    // `--out PATH` writes exactly there, a tokenizer of the released models' vocabulary size.
    let o = run_in(&dir, "make_reference_tokenizer", &["--out", "sub.json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(files, ["sub.json"]);
    let tok = tokenizers::Tokenizer::from_file(dir.join("sub.json")).unwrap();
    assert_eq!(tok.get_vocab_size(true), 100288);
}

/// The rows of long_run's table: (position, self state bytes, global K/V bytes).
fn long_run_rows(out: &str) -> Vec<(usize, usize, usize)> {
    out.lines()
        .filter(|l| l.starts_with("| ") && l.as_bytes().get(2).is_some_and(u8::is_ascii_digit))
        .map(|l| {
            let cells: Vec<usize> = l
                .split('|')
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .take(3)
                .map(|c| c.parse().unwrap())
                .collect();
            (cells[0], cells[1], cells[2])
        })
        .collect()
}

#[test]
fn long_run_decodes_the_tokens_asked_for() {
    let o = run("long_run", &["--tokens", "6", "--every", "2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let rows = long_run_rows(&stdout(&o));
    assert_eq!(
        rows.iter().map(|r| r.0).collect::<Vec<_>>(),
        [2, 4, 6],
        "{}",
        stdout(&o)
    );
    // Its model: dim 64, 4 attention heads (so 16 per head), 2 KV heads, f32: one K and one V
    // row of 2 x 16 values per token, whatever the number of layers (YOCO caches once).
    let kv_per_token = 2 * 2 * (64 / 4) * 4;
    for &(pos, state, kv) in &rows {
        assert_eq!(kv, pos * kv_per_token, "{}", stdout(&o));
        assert_eq!(state, rows[0].1, "the self-decoder state changed size");
    }
}

/// Greedy tokens by a cache-free full forward over the growing sequence, with the generation
/// defaults of a model without tokenizer: ids 0 and 1 never chosen, 2 (`</s>`) stops.
fn greedy_by_full_forward(model: &Model, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut seq = prompt.to_vec();
    let mut out = Vec::new();
    for _ in 0..n {
        let mut cache = model.new_cache(1).unwrap();
        let logits = model.forward(&common::ids(&seq), &mut cache).unwrap();
        let last: Vec<f32> = logits
            .get(0)
            .unwrap()
            .get(seq.len() - 1)
            .unwrap()
            .to_vec1()
            .unwrap();
        let mut best = 2;
        for (id, &x) in last.iter().enumerate().skip(2) {
            if x > last[best] {
                best = id;
            }
        }
        if best == 2 {
            break;
        }
        out.push(best as u32);
        seq.push(best as u32);
    }
    out
}

#[test]
fn generate_greedy_token_prompt_matches_a_full_forward() {
    let dir = common::fixture("gret");
    let o = run(
        "generate",
        &[
            "--model",
            dir.to_str().unwrap(),
            "--prompt-tokens",
            "3, 17,42,99",
            "--max-new-tokens",
            "12",
            "--greedy",
            "--json",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let json: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    let tokens: Vec<u32> = serde_json::from_value(json["tokens"].clone()).unwrap();
    assert_eq!(json["prompt_tokens"], serde_json::json!([3, 17, 42, 99]));
    let model = Model::load(&dir, &Device::Cpu, DType::F32).unwrap();
    assert_eq!(tokens, greedy_by_full_forward(&model, &[3, 17, 42, 99], 12));
}

/// The text `generate` streams for `prompt` and `cfg` (through the library, no example).
fn library_text(prompt: &str, cfg: GenerationConfig) -> String {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/shakespeare");
    let model = Model::load(&dir, &Device::Cpu, DType::F32).unwrap();
    let tok = Tokenizer::from_model_dir(&dir).unwrap();
    let cfg = cfg.for_tokenizer(&tok);
    let (text, _) = model
        .generate_text(&tok, prompt, &cfg, |_| std::ops::ControlFlow::Continue(()))
        .unwrap();
    let prompt_ids = tok.encode(prompt, true).unwrap();
    tok.decode(&prompt_ids, true).unwrap() + &text
}

#[test]
fn generate_defaults_are_the_documented_ones() {
    // No flags but a length: the shipped model, prompt "ROMEO.\n", the library's sampling
    // defaults and seed 299792458 (README).
    let o = run("generate", &["--max-new-tokens", "24"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let cfg = GenerationConfig {
        max_new_tokens: 24,
        seed: 299_792_458,
        ..GenerationConfig::default()
    };
    let expected = library_text("ROMEO.\n", cfg);
    let out = stdout(&o);
    assert!(
        out.starts_with(&expected),
        "got\n{out}\nexpected\n{expected}"
    );
    let last = out.trim_end().lines().last().unwrap();
    assert!(last.starts_with("[7 prompt tokens at "), "{last}");
    assert!(
        last.contains("stopped: ") && last.contains("model loaded in "),
        "{last}"
    );
}

#[test]
fn generate_sampling_flags_set_their_own_settings() {
    let o = run(
        "generate",
        &[
            "--prompt",
            "HAMLET.\n",
            "--max-new-tokens",
            "20",
            "--seed",
            "7",
            "--temperature",
            "1.3",
            "--top-k",
            "40",
            "--top-p",
            "0.9",
            "--min-p",
            "0.02",
            "--repeat-penalty",
            "1.3",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let cfg = GenerationConfig {
        max_new_tokens: 20,
        seed: 7,
        sampling: Sampling {
            temperature: 1.3,
            top_k: Some(40),
            top_p: Some(0.9),
            min_p: Some(0.02),
            repetition_penalty: 1.3,
            ..Sampling::default()
        },
        ..GenerationConfig::default()
    };
    let expected = library_text("HAMLET.\n", cfg);
    let out = stdout(&o);
    assert!(
        out.starts_with(&expected),
        "got\n{out}\nexpected\n{expected}"
    );
}

#[test]
fn score_reports_the_reference_nll() {
    let dir = scratch("score");
    let exp = common::expected("gret");
    let ids = dir.join("ids.json");
    std::fs::write(&ids, serde_json::to_string(&exp.tokens).unwrap()).unwrap();
    let fixture = common::fixture("gret");
    let o = run(
        "score",
        &[
            "--model",
            fixture.to_str().unwrap(),
            "--tokens-file",
            ids.to_str().unwrap(),
            "--json",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let json: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    // The NumPy reference's logits, in f64: mean of -log softmax(logits[t-1])[token t].
    let logp =
        candle_nn::ops::log_softmax(&exp.logits.to_dtype(DType::F64).unwrap(), D::Minus1).unwrap();
    let rows: Vec<Vec<f64>> = logp.to_vec2().unwrap();
    let n = exp.tokens.len();
    let nll: f64 = (1..n)
        .map(|t| -rows[t - 1][exp.tokens[t] as usize])
        .sum::<f64>()
        / (n - 1) as f64;
    assert_eq!(json["tokens"].as_u64(), Some(n as u64));
    let got = json["mean_nll"].as_f64().unwrap();
    assert!((got - nll).abs() < 1e-3, "score {got}, reference {nll}");
    let ppl = json["perplexity"].as_f64().unwrap();
    assert!((ppl.ln() - got).abs() < 1e-9);
}

#[test]
fn gpu_bench_runs_its_code_on_a_toy_shape() {
    let dir = scratch("gpu_bench");
    let json_path = dir.join("bench.json");
    let md_path = dir.join("bench.md");
    let o = run(
        "gpu_bench",
        &[
            "--device",
            "cpu",
            "--shape",
            "tiny",
            "--dtype",
            "f32",
            "--contexts",
            "64,128",
            "--llama-contexts",
            "64",
            "--decode-steps",
            "2",
            "--chunk",
            "32",
            "--json",
            json_path.to_str().unwrap(),
            "--markdown",
            md_path.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}\n{}", stdout(&o), stderr(&o));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    assert_eq!(report["failures"], serde_json::json!([]));
    let runs = report["runs"].as_array().unwrap();
    let find = |model: &str, ctx: u64| {
        runs.iter()
            .find(|r| r["model"] == model && r["context"].as_u64() == Some(ctx))
            .unwrap_or_else(|| panic!("no {model} {ctx} run in {report}"))
    };
    let bandwidth = report["bandwidth_bytes_per_s"].as_f64().unwrap();
    // Bytes a decode step reads: the bound is bandwidth / bytes.
    let bytes = |r: &serde_json::Value| bandwidth / r["hbm_bound_tok_s"].as_f64().unwrap();
    for (model, ctx) in [("yoco", 64), ("yoco", 128), ("llama", 64)] {
        let r = find(model, ctx);
        let prefill = r["prefill_s"].as_f64().unwrap();
        let decode = r["decode_tok_s"].as_f64().unwrap();
        assert!(prefill > 0.0 && prefill.is_finite(), "{r}");
        assert!(decode > 0.0 && decode.is_finite(), "{r}");
        let fraction = r["fraction_of_hbm_bound"].as_f64().unwrap();
        let bound = r["hbm_bound_tok_s"].as_f64().unwrap();
        assert!((fraction - decode / bound).abs() <= 1e-12 * fraction.abs().max(1.0));
    }
    // The toy shape: dim 256, 4 layers, 4 heads of 64, 2 KV heads, f32. A token's K and V are
    // 2 x 2 x 64 values; YOCO's 2 cross-decoder layers read the one global K/V, the
    // Transformer's 4 layers each read their own.
    let kv_token = 2 * 2 * 64 * 4;
    let yoco_growth = bytes(find("yoco", 128)) - bytes(find("yoco", 64));
    assert!((yoco_growth - (64 * 2 * kv_token) as f64).abs() < 1e-3 * yoco_growth);
    // 128 is not among the Transformer's contexts: its row gives the bound without running.
    let llama_128 = find("llama", 128);
    assert!(llama_128["prefill_s"].is_null());
    let llama_growth = bytes(llama_128) - bytes(find("llama", 64));
    assert!((llama_growth - (64 * 4 * kv_token) as f64).abs() < 1e-3 * llama_growth);
    let md = std::fs::read_to_string(&md_path).unwrap();
    assert!(
        md.contains("| yoco | 128 |") && md.contains("| llama | 64 |"),
        "{md}"
    );
}

#[test]
fn profile_puts_the_official_numbers_beside_its_own() {
    let dir = scratch("profile-official");
    let official = dir.join("official.jsonl");
    std::fs::write(
        &official,
        "{\"ctx\": 48, \"sw\": null, \"prefill_s\": 2.5, \"decode_tok_s\": 4.0}\n",
    )
    .unwrap();
    let out = run(
        "profile",
        &[
            "--contexts",
            "48",
            "--models",
            "yoco",
            "--decode-steps",
            "2",
            "--out",
            dir.join("out").to_str().unwrap(),
            "--official",
            official.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let cells =
        |line: &str| -> Vec<String> { line.split('|').map(|c| c.trim().to_string()).collect() };
    // Columns found by their headers, so that the table may grow.
    let header = cells(text.lines().find(|l| l.starts_with("| model |")).unwrap());
    let col = |name: &str| header.iter().position(|h| h == name).unwrap();
    let row = cells(
        text.lines()
            .find(|l| l.starts_with("| yoco | 48 |"))
            .unwrap(),
    );
    let prefill: f64 = row[col("prefill (s)")].parse().unwrap();
    let decode: f64 = row[col("decode tok/s")].parse().unwrap();
    assert_eq!(row[col("official prefill (s)")], "2.500");
    let speedup: f64 = row[col("prefill speed-up")]
        .trim_end_matches('x')
        .parse()
        .unwrap();
    assert!(
        (speedup - 2.5 / prefill).abs() <= 0.01 * speedup + 0.01,
        "{row:?}"
    );
    let decode_speedup: f64 = row[col("decode speed-up")]
        .trim_end_matches('x')
        .parse()
        .unwrap();
    assert!(
        (decode_speedup - decode / 4.0).abs() <= 0.01 * decode_speedup + 0.01,
        "{row:?}"
    );
    // A file that is not JSON lines is an error that names the line.
    std::fs::write(&official, "{\"ctx\": 48}\nnot json\n").unwrap();
    let out = run("profile", &["--official", official.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("line 1"), "{}", stderr(&out));
}

/// The load benchmark runs its rounds over loopback, stops by itself and counts every request
/// complete (its exit status says so), on a toy shape in a moment.
#[test]
fn load_runs_rounds_of_concurrent_clients_to_completion() {
    let o = run(
        "load",
        &[
            "--shape",
            "tiny",
            "--clients",
            "1,3",
            "--prompt-tokens",
            "20-60",
            "--new-tokens",
            "5",
            "--json",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let rounds: Vec<serde_json::Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rounds.len(), 2);
    for (round, clients) in rounds.iter().zip([1, 3]) {
        assert_eq!(round["clients"], clients);
        assert_eq!(round["complete"], clients);
        assert_eq!(round["generated"], 5 * clients);
        let prompt = round["prompt_tokens"].as_u64().unwrap();
        assert!((20 * clients..=60 * clients).contains(&prompt), "{round}");
    }
    // A bad range is a usage error.
    let o = run("load", &["--prompt-tokens", "9-3"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn quant_flags_load_the_quantized_model() {
    use yoco::{LoadOptions, Quant};
    let load = |dir: &Path, quant| {
        let options = LoadOptions {
            quant: Some(quant),
            ..LoadOptions::default()
        };
        Model::load_with(dir, &options).unwrap()
    };
    let fixture = common::fixture("gret");

    // generate: the library's greedy tokens from the model quantized the same way.
    let o = run(
        "generate",
        &[
            "--model",
            fixture.to_str().unwrap(),
            "--prompt-tokens",
            "3,17,42,99",
            "--max-new-tokens",
            "12",
            "--greedy",
            "--quant",
            "q4_0",
            "--json",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let json: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    let model = load(&fixture, Quant::Q4_0);
    let want = model
        .generate(&[3, 17, 42, 99], &GenerationConfig::greedy(12))
        .unwrap()
        .tokens;
    assert_eq!(json["tokens"], serde_json::json!(want));
    assert_eq!(json["quant"], "q4_0");
    assert_eq!(
        json["weight_bytes"].as_u64(),
        Some(model.weight_bytes() as u64)
    );

    // score: the quantized model's NLL, and the stored model's beside it.
    let dir = scratch("score-quant");
    let exp = common::expected("gret");
    let ids = dir.join("ids.json");
    std::fs::write(&ids, serde_json::to_string(&exp.tokens).unwrap()).unwrap();
    let o = run(
        "score",
        &[
            "--model",
            fixture.to_str().unwrap(),
            "--tokens-file",
            ids.to_str().unwrap(),
            "--quant",
            "q8_0",
            "--json",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let json: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    let nll = |model: &Model| {
        let mut cache = model.new_cache(1).unwrap();
        let logits = model
            .forward(&common::ids(&exp.tokens), &mut cache)
            .unwrap()
            .squeeze(0)
            .unwrap();
        let rows: Vec<Vec<f32>> = candle_nn::ops::log_softmax(&logits, D::Minus1)
            .unwrap()
            .to_vec2()
            .unwrap();
        let n = exp.tokens.len();
        (1..n)
            .map(|t| -f64::from(rows[t - 1][exp.tokens[t] as usize]))
            .sum::<f64>()
            / (n - 1) as f64
    };
    let quantized = nll(&load(&fixture, Quant::Q8_0));
    let stored = nll(&Model::load(&fixture, &Device::Cpu, DType::F32).unwrap());
    assert_eq!(json["quant"], "q8_0");
    assert!((json["mean_nll"].as_f64().unwrap() - quantized).abs() < 1e-6);
    assert!((json["float_mean_nll"].as_f64().unwrap() - stored).abs() < 1e-6);
    assert_ne!(quantized, stored);

    // long_run: the same cache growth with quantized weights.
    let o = run(
        "long_run",
        &["--tokens", "4", "--every", "2", "--quant", "q4_k"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(long_run_rows(&stdout(&o)).len(), 2, "{}", stdout(&o));
}

#[test]
fn quantize_writes_a_gguf_that_loads_as_quantizing_at_load_does() {
    let dir = scratch("quantize");
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/shakespeare");
    let out = dir.join("shakespeare-q4_k");
    let o = run(
        "quantize",
        &[
            "--model",
            shipped.to_str().unwrap(),
            "--quant",
            "q4_k",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("q4_k"), "{}", stdout(&o));
    // The tokenizer travels with it, so the folder is a complete model directory.
    assert!(out.join("tokenizer.json").is_file());
    let from_file = Model::load(&out, &Device::Cpu, DType::F32).unwrap();
    let options = yoco::LoadOptions {
        quant: Some(yoco::Quant::Q4K),
        ..yoco::LoadOptions::default()
    };
    let at_load = Model::load_with(&shipped, &options).unwrap();
    assert_eq!(from_file.weights(), at_load.weights());
    let ids = common::ids(&[1, 44, 463, 327, 369, 15]);
    let (mut a, mut b) = (
        from_file.new_cache(1).unwrap(),
        at_load.new_cache(1).unwrap(),
    );
    let (x, y) = (
        from_file.forward(&ids, &mut a).unwrap(),
        at_load.forward(&ids, &mut b).unwrap(),
    );
    assert_eq!(common::max_abs_diff(&x, &y), 0.0);
    // generate runs from that folder as from any model directory.
    let o = run(
        "generate",
        &["--model", out.to_str().unwrap(), "--max-new-tokens", "8"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
}

/// `chat` over a pipe: each line a turn, the answer streamed back; the second turn prefills only
/// what the cache does not hold; an empty line ends it. With the shipped model (no template) the
/// conversation is continued as plain text, and the first answer equals `generate_text` of the
/// first line with the same settings.
#[test]
fn chat_keeps_the_conversation_cache_between_turns() {
    use std::io::Write;
    use std::process::Stdio;
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/models/shakespeare");
    let mut child = Command::new(example("chat"))
        .args([
            "--max-tokens",
            "12",
            "--temperature",
            "0.8",
            "--top-p",
            "1",
            "--seed",
            "9",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"ROMEO.\nJULIET.\n\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let stats: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("new prompt tokens"))
        .collect();
    assert_eq!(stats.len(), 2, "{text}");
    assert!(stats[0].contains("(0 reused)"), "{}", stats[0]);
    assert!(
        !stats[1].contains("(0 reused)"),
        "the second turn reused nothing: {}",
        stats[1]
    );

    let model = Model::load(dir, &Device::Cpu, DType::F32).unwrap();
    let tokenizer = Tokenizer::from_model_dir(dir).unwrap();
    let cfg = GenerationConfig {
        max_new_tokens: 12,
        seed: 9,
        sampling: Sampling {
            temperature: 0.8,
            top_p: None,
            ..Sampling::default()
        },
        ..GenerationConfig::default()
    }
    .for_tokenizer(&tokenizer);
    let ids = tokenizer.encode("ROMEO.\n", true).unwrap();
    let gen = model.generate(&ids, &cfg).unwrap();
    let first = tokenizer.decode(&gen.tokens, true).unwrap();
    let shown = text.strip_prefix("> ").unwrap();
    assert!(
        shown.starts_with(&first),
        "{shown:?} does not start with {first:?}"
    );
}

/// A SIGTERM during 8 streams: every stream ends with a finish reason and `[DONE]` (those still
/// running when the grace period ends are cancelled, finish reason `abort`), and the server exits
/// with status 0.
#[cfg(unix)]
#[test]
fn serve_shuts_down_gracefully_on_sigterm() {
    use std::io::{BufRead, BufReader, Read};
    use std::process::Stdio;
    let mut child = Command::new(example("serve"))
        .args([
            "--port",
            "0",
            "--max-sequences",
            "8",
            "--shutdown-grace-s",
            "1",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr_lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let first = stderr_lines.next().unwrap().unwrap();
    let base = first
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no address in {first:?}"))
        .to_string();
    // Keep draining the server's log.
    let log = std::thread::spawn(move || stderr_lines.map_while(Result::ok).collect::<Vec<_>>());
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let streams: Vec<_> = (0..8)
        .map(|i| {
            let (base, started) = (base.clone(), started_tx.clone());
            std::thread::spawn(move || {
                let body = serde_json::json!({
                    "prompt": "ROMEO.\n", "max_tokens": 4000, "seed": i, "stream": true,
                    "temperature": 0.8,
                });
                let resp = ureq::post(format!("{base}/v1/completions"))
                    .header("content-type", "application/json")
                    .send(body.to_string())
                    .unwrap();
                let mut reader = BufReader::new(resp.into_body().into_reader());
                let (mut finish, mut done, mut line) = (None, false, String::new());
                let mut told = false;
                while reader.read_line(&mut line).unwrap_or(0) > 0 {
                    if let Some(data) = line.trim_end().strip_prefix("data: ") {
                        if !told {
                            told = true;
                            let _ = started.send(());
                        }
                        if data == "[DONE]" {
                            done = true;
                        } else if let Ok(v) = serde_json::from_str::<serde_json::Value>(data) {
                            if let Some(r) = v["choices"][0]["finish_reason"].as_str() {
                                finish = Some(r.to_string());
                            }
                        }
                    }
                    line.clear();
                }
                let mut rest = String::new();
                let _ = reader.read_to_string(&mut rest);
                (finish, done)
            })
        })
        .collect();
    for _ in 0..8 {
        started_rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .unwrap();
    }
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    for s in streams {
        let (finish, done) = s.join().unwrap();
        assert!(
            matches!(finish.as_deref(), Some("abort" | "length" | "stop")),
            "{finish:?}"
        );
        assert!(done, "a stream ended without [DONE]");
    }
    let status = child.wait().unwrap();
    let log = log.join().unwrap();
    assert!(status.success(), "{status:?}: {log:?}");
    assert!(log.iter().any(|l| l.contains("shut down")), "{log:?}");
}
