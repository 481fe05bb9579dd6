//! Strict loading and input checking: every broken model directory, checkpoint or input gives
//! the right `yoco::Error` variant with a message that names the problem, never a panic.
//!
//! Broken model directories are built in a fresh temporary folder per test from the `gret`
//! fixture (see tests/fixtures/README.md).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use common::{expected, fixture, ids, max_abs_diff};
use yoco::{Config, Error, Model};

/// The prefix under which the reference trainer saves the model's parameters.
const TRAINER_PREFIX: &str = "decoder.model.";

/// A directory under the system temp dir, unique per test (and per process), removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let path =
            std::env::temp_dir().join(format!("yoco-loading-{}-{n}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A copy of a fixture folder (its files, not `expected.safetensors`).
fn copy_fixture(name: &str, test: &str) -> TempDir {
    let dir = TempDir::new(test);
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name() == "expected.safetensors" {
            continue;
        }
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    dir
}

fn gret_tensors() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture("gret").join("model.safetensors"), &Device::Cpu).unwrap()
}

fn gret_params() -> serde_json::Map<String, serde_json::Value> {
    let text = std::fs::read_to_string(fixture("gret").join("params.json")).unwrap();
    match serde_json::from_str(&text).unwrap() {
        serde_json::Value::Object(m) => m,
        other => panic!("params.json is not an object: {other}"),
    }
}

/// A directory with `gret`'s weights and the given params.json text.
fn dir_with_params(test: &str, params: &str) -> TempDir {
    let dir = copy_fixture("gret", test);
    std::fs::write(dir.join("params.json"), params).unwrap();
    dir
}

/// A directory with `gret`'s params.json and the given tensors as model.safetensors.
fn dir_with_tensors(test: &str, tensors: &HashMap<String, Tensor>) -> TempDir {
    let dir = copy_fixture("gret", test);
    candle_core::safetensors::save(tensors, dir.join("model.safetensors")).unwrap();
    dir
}

/// `Model::load` must fail; returns the error.
fn load_err(dir: &Path) -> Error {
    match Model::load(dir, &Device::Cpu, DType::F32) {
        Ok(_) => panic!("{} loaded but should not", dir.display()),
        Err(e) => e,
    }
}

/// A params.json (`gret`'s) with one field set (or removed, for `None`); the loader must refuse it.
fn params_err(test: &str, field: &str, value: Option<serde_json::Value>) -> Error {
    let mut params = gret_params();
    match value {
        Some(v) => params.insert(field.to_string(), v),
        None => params.remove(field),
    };
    let text = serde_json::to_string_pretty(&params).unwrap();
    let dir = dir_with_params(test, &text);
    let err = load_err(dir.path());
    // The same text through `Config::from_json` gives the same kind of error.
    let again = Config::from_json(&text).unwrap_err();
    assert_eq!(
        std::mem::discriminant(&err),
        std::mem::discriminant(&again),
        "{err} vs {again}"
    );
    err
}

fn assert_config_err(err: Error, needles: &[&str]) {
    match &err {
        Error::Config(m) => {
            for n in needles {
                assert!(m.contains(n), "config error `{m}` does not mention `{n}`");
            }
        }
        other => panic!("expected Error::Config mentioning {needles:?}, got {other:?}"),
    }
}

fn assert_json_err(err: Error, needles: &[&str]) {
    match &err {
        Error::Json { path, message } => {
            assert!(path.ends_with("params.json"), "{}", path.display());
            for n in needles {
                assert!(
                    message.contains(n),
                    "json error `{message}` does not mention `{n}`"
                );
            }
        }
        other => panic!("expected Error::Json mentioning {needles:?}, got {other:?}"),
    }
}

fn assert_checkpoint_err(err: Error, needles: &[&str]) {
    match &err {
        Error::Checkpoint(m) => {
            for n in needles {
                assert!(
                    m.contains(n),
                    "checkpoint error `{m}` does not mention `{n}`"
                );
            }
        }
        other => panic!("expected Error::Checkpoint mentioning {needles:?}, got {other:?}"),
    }
}

/// Logits of a full forward over the first `n` fixture tokens.
fn logits(model: &Model, n: usize) -> Tensor {
    let exp = expected("gret");
    let mut cache = model.new_cache(1).unwrap();
    model.forward(&ids(&exp.tokens[..n]), &mut cache).unwrap()
}

// ---------------------------------------------------------------------------------------------
// params.json

#[test]
fn missing_params_json_is_io_error() {
    let dir = copy_fixture("gret", "no-params");
    std::fs::remove_file(dir.join("params.json")).unwrap();
    match load_err(dir.path()) {
        Error::Io { path, .. } => assert!(path.ends_with("params.json"), "{}", path.display()),
        other => panic!("expected Error::Io, got {other:?}"),
    }
}

#[test]
fn params_json_that_is_not_json() {
    for (i, text) in ["", "not json", "{\"dim\": 64,", "[1, 2, 3]", "\u{0}\u{1}"]
        .iter()
        .enumerate()
    {
        let dir = dir_with_params(&format!("not-json-{i}"), text);
        match load_err(dir.path()) {
            Error::Json { path, message } => {
                assert!(path.ends_with("params.json"), "{}", path.display());
                assert!(!message.is_empty());
            }
            other => panic!("{text:?}: expected Error::Json, got {other:?}"),
        }
    }
}

#[test]
fn params_json_missing_field() {
    for field in ["dim", "n_layers", "vocab_size", "n_attn_kv_heads"] {
        let err = params_err("missing-field", field, None);
        assert_json_err(err, &["missing field", field]);
    }
}

#[test]
fn params_json_unknown_field() {
    let err = params_err("unknown-field", "dimm", Some(64.into()));
    assert_json_err(err, &["unknown field", "dimm"]);
}

#[test]
fn params_json_negative_number() {
    for field in ["n_layers", "dim", "sliding_window"] {
        let err = params_err("negative", field, Some((-2).into()));
        assert_json_err(err, &[field, "-2"]);
    }
}

#[test]
fn params_json_wrong_types() {
    let err = params_err("float-dim", "dim", Some(serde_json::json!(64.5)));
    assert_json_err(err, &["dim"]);
    let err = params_err("string-dim", "dim", Some(serde_json::json!("64")));
    assert_json_err(err, &["dim"]);
    let err = params_err("string-theta", "rope_theta", Some(serde_json::json!("1e4")));
    assert_json_err(err, &["rope_theta"]);
}

#[test]
fn params_json_huge_numbers() {
    // Not representable as usize: a JSON error naming the field.
    let text = gret_params_text_with("\"dim\": 64", "\"dim\": 100000000000000000000000000000");
    let dir = dir_with_params("huge-literal", &text);
    assert_json_err(load_err(dir.path()), &["dim"]);
    let err = params_err("huge-float", "n_layers", Some(serde_json::json!(1e30)));
    assert_json_err(err, &["n_layers"]);
    // Representable but absurd: refused by validation before anything is allocated.
    for (field, value) in [
        ("vocab_size", 10_000_000_000u64),
        ("dim", 1 << 40),
        ("hidden_dim", u64::MAX),
        ("n_layers", 1 << 20),
        ("sliding_window", 1 << 40),
        ("max_positions", 1 << 40),
    ] {
        let err = params_err("huge", field, Some(value.into()));
        assert_config_err(err, &[field]);
    }
    // A float literal too large for f64 is not even valid JSON for serde_json.
    let text = gret_params_text_with("\"dim\": 64", "\"dim\": 64, \"rope_theta\": 1e999");
    let dir = dir_with_params("huge-theta", &text);
    assert!(matches!(load_err(dir.path()), Error::Json { .. }));
}

fn gret_params_text_with(from: &str, to: &str) -> String {
    let text = serde_json::to_string(&gret_params())
        .unwrap()
        .replace(": ", ":");
    let from = from.replace(": ", ":");
    assert!(text.contains(&from), "{text}");
    text.replace(&from, to)
}

#[test]
fn params_json_impossible_shapes_are_config_errors() {
    let cases: &[(&str, serde_json::Value, &[&str])] = &[
        ("n_layers", 3.into(), &["n_layers", "even", "3"]),
        ("n_layers", 0.into(), &["n_layers", "0"]),
        ("dim", 0.into(), &["dim", "0"]),
        ("vocab_size", 0.into(), &["vocab_size"]),
        ("hidden_dim", 0.into(), &["hidden_dim"]),
        ("n_self_heads", 3.into(), &["n_self_heads", "64"]),
        ("n_attn_heads", 3.into(), &["n_attn_heads", "64"]),
        ("n_attn_kv_heads", 3.into(), &["n_attn_kv_heads", "4"]),
        ("n_attn_kv_heads", 0.into(), &["n_attn_kv_heads"]),
        // Head size 64/64 = 1: RoPE needs pairs.
        ("n_self_heads", 64.into(), &["odd", "self"]),
        ("sliding_window", 0.into(), &["sliding_window", "0"]),
        ("max_positions", 0.into(), &["max_positions"]),
        ("rope_theta", serde_json::json!(0.5), &["rope_theta"]),
        ("norm_eps", serde_json::json!(0.0), &["norm_eps"]),
        ("norm_eps", serde_json::json!(-1e-5), &["norm_eps"]),
    ];
    for (field, value, needles) in cases {
        let err = params_err("shape", field, Some(value.clone()));
        assert_config_err(err, needles);
    }
    // Odd cross-decoder head size (64/64 = 1) with a valid GQA grouping.
    let mut params = gret_params();
    params.insert("n_attn_heads".into(), 64.into());
    params.insert("n_attn_kv_heads".into(), 64.into());
    let err = Config::from_json(&serde_json::to_string(&params).unwrap()).unwrap_err();
    assert_config_err(err, &["odd", "cross"]);
}

#[test]
fn config_built_in_code_is_validated_by_model_new() {
    let mut cfg = Config::from_file(fixture("gret").join("params.json")).unwrap();
    cfg.n_layers = 5;
    let vb = VarBuilder::from_tensors(gret_tensors(), DType::F32, &Device::Cpu);
    match Model::new(cfg, vb) {
        Err(e) => assert_config_err(e, &["n_layers"]),
        Ok(_) => panic!("odd n_layers accepted"),
    }
}

// ---------------------------------------------------------------------------------------------
// Weight files: what is there

#[test]
fn no_weights_at_all() {
    let dir = copy_fixture("gret", "no-weights");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    match load_err(dir.path()) {
        Error::NoWeights(p) => assert_eq!(p, dir.path()),
        other => panic!("expected Error::NoWeights, got {other:?}"),
    }
    // A folder named like a weight file is not a weight file.
    std::fs::create_dir(dir.join("model.safetensors")).unwrap();
    assert!(matches!(load_err(dir.path()), Error::NoWeights(_)));
}

#[test]
fn missing_tensor_is_named_with_its_shape() {
    for (name, shape) in [
        ("self_decoder.layers.1.mixer.gt_proj.weight", vec![4, 64]),
        ("cross_decoder.k_proj.weight", vec![32, 64]),
        ("output_projection.weight", vec![256, 64]),
    ] {
        let mut tensors = gret_tensors();
        assert!(tensors.remove(name).is_some());
        let dir = dir_with_tensors("missing-tensor", &tensors);
        match load_err(dir.path()) {
            Error::MissingTensor { name: n, expected } => {
                assert_eq!(n, name);
                assert_eq!(expected, shape);
            }
            other => panic!("expected Error::MissingTensor for {name}, got {other:?}"),
        }
        let msg = load_err(dir.path()).to_string();
        assert!(
            msg.contains(name) && msg.contains(&format!("{shape:?}")),
            "{msg}"
        );
    }
}

#[test]
fn wrongly_shaped_tensor() {
    let mut tensors = gret_tensors();
    let name = "cross_decoder.k_proj.weight";
    tensors.insert(
        name.into(),
        Tensor::zeros((16, 64), DType::F32, &Device::Cpu).unwrap(),
    );
    let dir = dir_with_tensors("wrong-shape", &tensors);
    let err = load_err(dir.path());
    let msg = err.to_string();
    match err {
        Error::ShapeMismatch {
            name: n,
            expected,
            actual,
        } => {
            assert_eq!(n, name);
            assert_eq!(expected, vec![32, 64]);
            assert_eq!(actual, vec![16, 64]);
        }
        other => panic!("expected Error::ShapeMismatch, got {other:?}"),
    }
    assert!(
        msg.contains(name) && msg.contains("[16, 64]") && msg.contains("[32, 64]"),
        "{msg}"
    );

    // Transposed (the right numbers in the wrong order) and an extra unit axis.
    for (name, bad) in [
        ("self_decoder.layers.0.ffn.fc1.weight", vec![64, 160]),
        ("layer_norm.weight", vec![1, 64]),
    ] {
        let mut tensors = gret_tensors();
        tensors.insert(
            name.into(),
            Tensor::zeros(bad.clone(), DType::F32, &Device::Cpu).unwrap(),
        );
        let dir = dir_with_tensors("wrong-shape-2", &tensors);
        match load_err(dir.path()) {
            Error::ShapeMismatch {
                name: n, actual, ..
            } => {
                assert_eq!(n, name);
                assert_eq!(actual, bad);
            }
            other => panic!("expected Error::ShapeMismatch for {name}, got {other:?}"),
        }
    }
}

#[test]
fn unexpected_extra_tensor() {
    let mut tensors = gret_tensors();
    let extra = "self_decoder.layers.2.mixer.q_proj.weight";
    tensors.insert(
        extra.into(),
        Tensor::zeros((64, 64), DType::F32, &Device::Cpu).unwrap(),
    );
    let dir = dir_with_tensors("extra-tensor", &tensors);
    match load_err(dir.path()) {
        Error::UnexpectedTensors(m) => assert!(m.contains(extra), "{m}"),
        other => panic!("expected Error::UnexpectedTensors, got {other:?}"),
    }
    // SWA weights in a gRet model: g_proj/gt_proj would be missing; the reverse (gRet weights
    // with a sliding_window config) leaves g_proj and gt_proj unused.
    let mut params = gret_params();
    params.insert("sliding_window".into(), 8.into());
    let dir = dir_with_params(
        "extra-gret-weights",
        &serde_json::to_string(&params).unwrap(),
    );
    match load_err(dir.path()) {
        Error::UnexpectedTensors(m) => {
            assert!(m.contains("gt_proj") && m.contains("g_proj"), "{m}")
        }
        other => panic!("expected Error::UnexpectedTensors, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Weight files: corrupt safetensors

#[test]
fn truncated_safetensors() {
    let bytes = std::fs::read(fixture("gret").join("model.safetensors")).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    for (i, len) in [
        0,
        4,
        8,
        20,
        8 + header_len,
        8 + header_len + 100,
        bytes.len() / 2,
        bytes.len() - 1,
    ]
    .into_iter()
    .enumerate()
    {
        let dir = copy_fixture("gret", &format!("truncated-{i}"));
        std::fs::write(dir.join("model.safetensors"), &bytes[..len]).unwrap();
        let err = load_err(dir.path());
        assert_checkpoint_err(err, &["model.safetensors"]);
    }
}

/// A safetensors file written by hand: `entries` are (name, dtype, shape, data_offsets).
fn write_safetensors(path: &Path, entries: &[Entry], data: &[u8]) {
    let mut header = serde_json::Map::new();
    for (name, dtype, shape, offsets) in entries {
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": offsets}),
        );
    }
    let header = serde_json::to_vec(&serde_json::Value::Object(header)).unwrap();
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&header);
    bytes.extend_from_slice(data);
    std::fs::write(path, bytes).unwrap();
}

/// One hand-written safetensors header entry: name, dtype, shape, data_offsets.
type Entry = (String, &'static str, Vec<usize>, [u64; 2]);

/// `gret`'s tensors as hand-written safetensors entries (sorted by name) and their data.
fn gret_entries() -> (Vec<Entry>, Vec<u8>) {
    let tensors: BTreeMap<String, Tensor> = gret_tensors().into_iter().collect();
    let mut entries = Vec::new();
    let mut data = Vec::new();
    for (name, t) in tensors {
        let start = data.len() as u64;
        for x in t.flatten_all().unwrap().to_vec1::<f32>().unwrap() {
            data.extend_from_slice(&x.to_le_bytes());
        }
        entries.push((name, "F32", t.dims().to_vec(), [start, data.len() as u64]));
    }
    (entries, data)
}

#[test]
fn hand_written_safetensors_load() {
    // The control for the lying-header tests below: the writer itself is right.
    let (entries, data) = gret_entries();
    let dir = copy_fixture("gret", "hand-written");
    write_safetensors(&dir.join("model.safetensors"), &entries, &data);
    let model = Model::load(dir.path(), &Device::Cpu, DType::F32).unwrap();
    let reference = Model::load(fixture("gret"), &Device::Cpu, DType::F32).unwrap();
    assert_eq!(
        max_abs_diff(&logits(&model, 20), &logits(&reference, 20)),
        0.0
    );
}

#[test]
fn lying_safetensors_headers() {
    let (entries, data) = gret_entries();
    let last = entries.len() - 1;
    let victim = entries[last].0.clone();
    let n = data.len() as u64;
    type Edit = Box<dyn Fn(&mut Vec<Entry>, &mut Vec<u8>)>;
    let cases: Vec<(&str, Edit, Vec<String>)> = vec![
        (
            "offsets past the end of the file",
            Box::new(move |e, _| {
                let [s, t] = e[last].3;
                e[last].3 = [s + 1000, t + 1000];
            }),
            vec![victim.clone()],
        ),
        (
            "offsets far past the end",
            Box::new(move |e, _| e[last].3 = [u64::MAX - 10, u64::MAX]),
            vec![victim.clone()],
        ),
        (
            "end before start",
            Box::new(move |e, _| e[last].3 = [n, 0]),
            vec![victim.clone()],
        ),
        (
            "range of the wrong size",
            Box::new(move |e, _| e[last].3[1] -= 4),
            vec![victim.clone()],
        ),
        (
            "shape claiming more than the range",
            Box::new(move |e, _| e[last].2 = vec![1 << 20, 1 << 20]),
            vec![victim.clone()],
        ),
        (
            "overflowing shape",
            Box::new(move |e, _| e[last].2 = vec![usize::MAX, usize::MAX, 4]),
            vec![victim.clone()],
        ),
        (
            "data section cut short",
            Box::new(|_, d| d.truncate(d.len() - 1)),
            vec![],
        ),
        (
            // In range and of the right size, but overlapping another tensor: only candle's own
            // (stricter) parser sees this one.
            "two tensors on the same bytes",
            Box::new(|e, _| {
                let i = e
                    .iter()
                    .position(|x| x.0 == "self_decoder.layers.0.mixer.k_proj.weight")
                    .unwrap();
                let j = e
                    .iter()
                    .position(|x| x.0 == "self_decoder.layers.0.mixer.q_proj.weight")
                    .unwrap();
                e[i].3 = e[j].3;
            }),
            vec![],
        ),
        (
            "unknown dtype",
            Box::new(move |e, _| e[last].1 = "F8_E9M9"),
            vec![victim.clone()],
        ),
    ];
    for (what, edit, needles) in cases {
        let (mut e, mut d) = (entries.clone(), data.clone());
        edit(&mut e, &mut d);
        let dir = copy_fixture("gret", "lying-header");
        write_safetensors(&dir.join("model.safetensors"), &e, &d);
        // Quantizing as it loads reads the file tensor by tensor instead of mapping it: the
        // same checks come first.
        let options = yoco::LoadOptions {
            quant: Some(yoco::Quant::Q8_0),
            ..yoco::LoadOptions::default()
        };
        match Model::load_with(dir.path(), &options) {
            Err(Error::Checkpoint(m)) => assert!(m.contains("model.safetensors"), "{what}: {m}"),
            other => panic!("{what} (quantized): expected Error::Checkpoint, got {other:?}"),
        }
        let err = load_err(dir.path());
        let msg = err.to_string();
        match err {
            Error::Checkpoint(m) => {
                assert!(m.contains("model.safetensors"), "{what}: {m}");
                for n in &needles {
                    assert!(m.contains(n.as_str()), "{what}: `{m}` does not name `{n}`");
                }
            }
            other => panic!("{what}: expected Error::Checkpoint, got {other:?}"),
        }
        assert!(!msg.is_empty());
    }
}

/// A header (padded with 4 data bytes) preceded by its length.
fn with_len(header: &[u8]) -> Vec<u8> {
    [
        (header.len() as u64).to_le_bytes().as_slice(),
        header,
        &[0u8; 4],
    ]
    .concat()
}

#[test]
fn lying_safetensors_header_length_and_json() {
    let dir = copy_fixture("gret", "lying-header-len");
    let path = dir.join("model.safetensors");
    for (i, bytes) in [
        // Header length far beyond the file.
        [u64::MAX.to_le_bytes().as_slice(), b"{}"].concat(),
        [(1u64 << 40).to_le_bytes().as_slice(), b"{}"].concat(),
        // Header that is not JSON, or not an object of tensors.
        [4u64.to_le_bytes().as_slice(), b"{{{{"].concat(),
        [2u64.to_le_bytes().as_slice(), b"[]"].concat(),
        with_len(br#"{"embed_tokens.weight": {"dtype": 7, "shape": [1], "data_offsets": [0, 4]}}"#),
        with_len(
            br#"{"embed_tokens.weight": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}"#,
        ),
        with_len(
            br#"{"embed_tokens.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}"#,
        ),
    ]
    .iter()
    .enumerate()
    {
        std::fs::write(&path, bytes).unwrap();
        let err = load_err(dir.path());
        assert!(matches!(err, Error::Checkpoint(_)), "case {i}: {err:?}");
        assert!(
            err.to_string().contains("model.safetensors"),
            "case {i}: {err}"
        );
    }
}

#[test]
fn integer_dtype_tensor() {
    let name = "layer_norm.weight";
    for dtype in [DType::I64, DType::U32, DType::U8] {
        let mut tensors = gret_tensors();
        tensors.insert(name.into(), Tensor::zeros(64, dtype, &Device::Cpu).unwrap());
        let dir = dir_with_tensors("int-dtype", &tensors);
        assert_checkpoint_err(load_err(dir.path()), &[name, "dtype"]);
    }
    // The same check guards checkpoint.pth (a unit test of the checkpoint module).
}

// ---------------------------------------------------------------------------------------------
// Sharded safetensors and checkpoint.pth

#[test]
fn shard_listed_in_index_but_absent() {
    let dir = copy_fixture("gret_sharded", "missing-shard");
    std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    assert_checkpoint_err(
        load_err(dir.path()),
        &["model-00002-of-00002.safetensors", "index"],
    );
}

#[test]
fn broken_shard_index() {
    let dir = copy_fixture("gret_sharded", "bad-index");
    let index = dir.join("model.safetensors.index.json");
    for (i, text) in [
        "not json",
        "{}",
        r#"{"weight_map": {}}"#,
        r#"{"weight_map": {"embed_tokens.weight": 3}}"#,
        r#"{"weight_map": {"embed_tokens.weight": "../gret/model.safetensors"}}"#,
    ]
    .iter()
    .enumerate()
    {
        std::fs::write(&index, text).unwrap();
        match load_err(dir.path()) {
            Error::Json { path, .. } => assert!(path.ends_with("model.safetensors.index.json")),
            other => panic!("index {i} {text:?}: expected Error::Json, got {other:?}"),
        }
    }
    // An index naming only one of the two shards: the other half of the tensors is missing.
    std::fs::write(
        &index,
        r#"{"weight_map": {"embed_tokens.weight": "model-00001-of-00002.safetensors"}}"#,
    )
    .unwrap();
    assert!(matches!(load_err(dir.path()), Error::MissingTensor { .. }));
    // The same tensor in both shards.
    std::fs::copy(
        dir.join("model-00001-of-00002.safetensors"),
        dir.join("model-00002-of-00002.safetensors"),
    )
    .unwrap();
    std::fs::copy(
        fixture("gret_sharded").join("model.safetensors.index.json"),
        &index,
    )
    .unwrap();
    assert_checkpoint_err(load_err(dir.path()), &["more than one shard"]);
}

#[test]
fn corrupt_checkpoint_pth() {
    let bytes = std::fs::read(fixture("gret_pth").join("checkpoint.pth")).unwrap();
    // Deterministic pseudo-random bytes.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let random: Vec<u8> = (0..4096)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("random bytes", random),
        ("empty", vec![]),
        ("truncated zip (half)", bytes[..bytes.len() / 2].to_vec()),
        (
            "truncated zip (last byte)",
            bytes[..bytes.len() - 1].to_vec(),
        ),
        ("zip magic only", b"PK\x03\x04".to_vec()),
    ];
    for (what, content) in cases {
        let dir = copy_fixture("gret_pth", "corrupt-pth");
        std::fs::write(dir.join("checkpoint.pth"), &content).unwrap();
        match load_err(dir.path()) {
            Error::Checkpoint(m) => assert!(m.contains("checkpoint.pth"), "{what}: {m}"),
            other => panic!("{what}: expected Error::Checkpoint, got {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Names: the trainer prefix

#[test]
fn trainer_prefix_works_for_safetensors() {
    let prefixed: HashMap<String, Tensor> = gret_tensors()
        .into_iter()
        .map(|(k, v)| (format!("{TRAINER_PREFIX}{k}"), v))
        .collect();
    let dir = dir_with_tensors("prefixed", &prefixed);
    let model = Model::load(dir.path(), &Device::Cpu, DType::F32).unwrap();
    let reference = Model::load(fixture("gret"), &Device::Cpu, DType::F32).unwrap();
    assert_eq!(
        max_abs_diff(&logits(&model, 40), &logits(&reference, 40)),
        0.0
    );
    // Errors name the tensor as the file spells it.
    let mut tensors = prefixed.clone();
    tensors.remove("decoder.model.cross_decoder.v_proj.weight");
    let dir = dir_with_tensors("prefixed-missing", &tensors);
    match load_err(dir.path()) {
        Error::MissingTensor { name, .. } => {
            assert_eq!(name, "decoder.model.cross_decoder.v_proj.weight")
        }
        other => panic!("expected Error::MissingTensor, got {other:?}"),
    }
}

#[test]
fn mixed_prefixed_and_plain_names_are_an_error() {
    for n_plain in [1, 10] {
        let tensors: HashMap<String, Tensor> = gret_tensors()
            .into_iter()
            .collect::<BTreeMap<_, _>>()
            .into_iter()
            .enumerate()
            .map(|(i, (k, v))| {
                if i < n_plain {
                    (k, v)
                } else {
                    (format!("{TRAINER_PREFIX}{k}"), v)
                }
            })
            .collect();
        let dir = dir_with_tensors("mixed-prefix", &tensors);
        assert_checkpoint_err(load_err(dir.path()), &["mix", TRAINER_PREFIX]);
    }
}

// ---------------------------------------------------------------------------------------------
// Model::new with weights the caller brings

#[test]
fn model_new_with_a_candle_var_builder_equals_model_load() {
    let cfg = Config::from_file(fixture("gret").join("params.json")).unwrap();
    let path = fixture("gret").join("model.safetensors");
    // SAFETY: the fixture is not modified while it is mapped.
    let vb =
        unsafe { VarBuilder::from_mmaped_safetensors(&[path], DType::F32, &Device::Cpu).unwrap() };
    let model = Model::new(cfg.clone(), vb).unwrap();
    let loaded = Model::load(fixture("gret"), &Device::Cpu, DType::F32).unwrap();
    let a = logits(&model, 60);
    assert_eq!(max_abs_diff(&a, &logits(&loaded, 60)), 0.0);
    let exp = expected("gret");
    assert!(
        max_abs_diff(
            &a.squeeze(0).unwrap(),
            &exp.logits.narrow(0, 0, 60).unwrap()
        ) < 1e-4
    );

    // From in-memory tensors, too; a missing tensor is a candle error naming it.
    let vb = VarBuilder::from_tensors(gret_tensors(), DType::F32, &Device::Cpu);
    let model = Model::new(cfg.clone(), vb).unwrap();
    assert_eq!(max_abs_diff(&logits(&model, 60), &a), 0.0);
    let mut tensors = gret_tensors();
    tensors.remove("cross_decoder.kv_layer_norm.weight");
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    match Model::new(cfg, vb) {
        Err(e) => assert!(e.to_string().contains("kv_layer_norm"), "{e}"),
        Ok(_) => panic!("missing tensor accepted"),
    }
}

// ---------------------------------------------------------------------------------------------
// Bad runtime input

fn assert_input_err<T: std::fmt::Debug>(r: yoco::Result<T>, needle: &str) {
    match r {
        Err(Error::Input(m)) => assert!(
            m.contains(needle),
            "input error `{m}` does not mention `{needle}`"
        ),
        other => panic!("expected Error::Input mentioning `{needle}`, got {other:?}"),
    }
}

#[test]
fn bad_token_ids_are_input_errors() {
    let model = Model::load(fixture("gret"), &Device::Cpu, DType::F32).unwrap();
    let exp = expected("gret");
    let dev = &Device::Cpu;
    let mut cache = model.new_cache(1).unwrap();

    // Out of the vocabulary (256).
    assert_input_err(model.forward(&ids(&[1, 2, 256]), &mut cache), "256");
    assert_input_err(model.prefill(&ids(&[u32::MAX]), &mut cache), "out of range");
    assert_input_err(
        model.step(&Tensor::new(&[300u32], dev).unwrap(), &mut cache),
        "300",
    );
    let negative = Tensor::new(&[[3i64, -1]], dev).unwrap();
    assert_input_err(model.forward(&negative, &mut cache), "out of range");
    // Empty.
    let empty = Tensor::zeros((1, 0), DType::U32, dev).unwrap();
    assert_input_err(model.forward(&empty, &mut cache), "empty");
    assert_input_err(model.prefill(&empty, &mut cache), "empty");
    assert_input_err(model.prefill_chunked(&empty, &mut cache, 4), "empty");
    assert_input_err(
        model.step(&Tensor::zeros(0, DType::U32, dev).unwrap(), &mut cache),
        "",
    );
    // Wrong batch size for the cache.
    let two_rows = Tensor::new(&[[1u32, 2], [3, 4]], dev).unwrap();
    assert_input_err(model.forward(&two_rows, &mut cache), "batch");
    assert_input_err(model.prefill(&two_rows, &mut cache), "batch");
    assert_input_err(
        model.step(&Tensor::new(&[1u32, 2], dev).unwrap(), &mut cache),
        "batch",
    );
    let mut cache2 = model.new_cache(2).unwrap();
    assert_input_err(model.forward(&ids(&[1, 2]), &mut cache2), "batch");
    // Step with two tokens.
    assert_input_err(model.step(&ids(&[1, 2]), &mut cache), "one token");
    // Wrong rank or dtype.
    let rank3 = Tensor::zeros((1, 2, 2), DType::U32, dev).unwrap();
    assert_input_err(model.forward(&rank3, &mut cache), "shape");
    assert_input_err(
        model.forward(&rank3.flatten_all().unwrap(), &mut cache),
        "shape",
    );
    let float_ids = Tensor::new(&[[1f32, 2.0]], dev).unwrap();
    assert_input_err(model.forward(&float_ids, &mut cache), "u32");
    // Chunk size zero.
    assert_input_err(model.prefill_chunked(&ids(&[1, 2]), &mut cache, 0), "chunk");
    assert!(model.new_cache(0).is_err());

    // None of that touched the cache: it still gives the reference logits.
    assert_eq!(cache.positions(), &[0]);
    let l = model
        .forward(&ids(&exp.tokens[..30]), &mut cache)
        .unwrap()
        .squeeze(0)
        .unwrap();
    assert!(max_abs_diff(&l, &exp.logits.narrow(0, 0, 30).unwrap()) < 1e-4);
    // And errors in the middle of a sequence leave it where it was.
    assert_input_err(model.forward(&ids(&[5, 999]), &mut cache), "999");
    assert_input_err(model.step(&ids(&[5, 6]), &mut cache), "one token");
    assert_eq!(cache.positions(), &[30]);
    let l = model
        .step(&Tensor::new(&[exp.tokens[30]], dev).unwrap(), &mut cache)
        .unwrap();
    assert!(max_abs_diff(&l, &exp.logits.narrow(0, 30, 1).unwrap()) < 1e-4);
}

#[test]
fn sequence_beyond_max_positions_is_an_input_error() {
    let mut params = gret_params();
    params.insert("max_positions".into(), 10.into());
    let dir = dir_with_params("max-positions", &serde_json::to_string(&params).unwrap());
    let model = Model::load(dir.path(), &Device::Cpu, DType::F32).unwrap();
    assert_eq!(model.config().max_positions(), 10);
    let exp = expected("gret");
    let dev = &Device::Cpu;

    let mut cache = model.new_cache(1).unwrap();
    assert_input_err(model.forward(&ids(&exp.tokens[..11]), &mut cache), "10");
    assert_input_err(model.prefill(&ids(&exp.tokens[..11]), &mut cache), "limit");
    assert_input_err(
        model.prefill_chunked(&ids(&exp.tokens[..11]), &mut cache, 3),
        "limit",
    );
    assert_eq!(cache.positions(), &[0]);

    // Exactly the limit is fine; one more step is not.
    let l = model
        .prefill_chunked(&ids(&exp.tokens[..7]), &mut cache, 3)
        .unwrap();
    assert!(max_abs_diff(&l, &exp.logits.narrow(0, 6, 1).unwrap()) < 1e-4);
    assert_input_err(model.forward(&ids(&exp.tokens[7..11]), &mut cache), "11");
    for pos in 7..10 {
        let tok = Tensor::new(&[exp.tokens[pos]], dev).unwrap();
        let l = model.step(&tok, &mut cache).unwrap();
        assert!(max_abs_diff(&l, &exp.logits.narrow(0, pos, 1).unwrap()) < 1e-4);
    }
    assert_eq!(cache.positions(), &[10]);
    let tok = Tensor::new(&[exp.tokens[10]], dev).unwrap();
    assert_input_err(model.step(&tok, &mut cache), "limit");
    assert_eq!(cache.positions(), &[10]);
    // A reset cache starts over.
    cache.reset().unwrap();
    let l = model.forward(&ids(&exp.tokens[..10]), &mut cache).unwrap();
    assert_eq!(l.dims(), &[1, 10, 256]);
}

// ---------------------------------------------------------------------------------------------
// Mean next-token NLL through the library equals the one from the reference logits (what
// `examples/score.rs` prints for the same ids).

/// Mean over positions 1..T of -log softmax(logits[t-1])[tokens[t]], in f64.
fn mean_nll(logits: &Tensor, tokens: &[u32]) -> f64 {
    let rows: Vec<Vec<f32>> = logits.to_vec2().unwrap();
    let mut total = 0.0f64;
    for t in 1..tokens.len() {
        let row = &rows[t - 1];
        let max = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
        let lse = max
            + row
                .iter()
                .map(|&x| (x as f64 - max).exp())
                .sum::<f64>()
                .ln();
        total += lse - row[tokens[t] as usize] as f64;
    }
    total / (tokens.len() - 1) as f64
}

#[test]
fn mean_nll_matches_reference_logits() {
    let exp = expected("gret");
    let model = Model::load(fixture("gret"), &Device::Cpu, DType::F32).unwrap();
    let ours = logits(&model, exp.tokens.len()).squeeze(0).unwrap();
    let nll_ref = mean_nll(&exp.logits, &exp.tokens);
    let nll = mean_nll(&ours, &exp.tokens);
    assert!((nll - nll_ref).abs() < 1e-5, "{nll} vs {nll_ref}");
    // The on-device computation the example uses (log_softmax + gather) agrees.
    let logp =
        candle_nn::ops::log_softmax(&ours.narrow(0, 0, exp.tokens.len() - 1).unwrap(), 1).unwrap();
    let targets = Tensor::new(&exp.tokens[1..], &Device::Cpu)
        .unwrap()
        .unsqueeze(1)
        .unwrap();
    let picked: Vec<f32> = logp
        .gather(&targets, 1)
        .unwrap()
        .squeeze(1)
        .unwrap()
        .to_vec1()
        .unwrap();
    let nll_dev = -picked.iter().map(|&x| x as f64).sum::<f64>() / picked.len() as f64;
    assert!((nll_dev - nll_ref).abs() < 1e-5, "{nll_dev} vs {nll_ref}");
    // Random weights on random tokens: about ln(256) ~ 5.5 or worse, and finite.
    assert!(nll_ref.is_finite() && nll_ref > 1.0, "{nll_ref}");
}

/// The fixture's `checkpoint.pth` with its `data.pkl` replaced by `pickle` (every other entry
/// kept), written uncompressed as torch does.
fn pth_with_pickle(pickle: &[u8]) -> Vec<u8> {
    use std::io::{Read, Write};
    let bytes = std::fs::read(fixture("gret_pth").join("checkpoint.pth")).unwrap();
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
    let mut out = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let stored =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for i in 0..archive.len() {
        let mut entry = archive.by_index(i).unwrap();
        let name = entry.name().unwrap().into_owned();
        let mut data = Vec::new();
        entry.read_to_end(&mut data).unwrap();
        out.start_file(name.as_str(), stored).unwrap();
        if name.ends_with("data.pkl") {
            out.write_all(pickle).unwrap();
        } else {
            out.write_all(&data).unwrap();
        }
    }
    out.finish().unwrap().into_inner()
}

#[test]
fn hostile_pickles_in_checkpoint_pth_are_errors_not_allocations_or_panics() {
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            // A string that claims 4 GiB: candle alone would allocate it before reading.
            "string length past the end",
            b"\x80\x02}X\xf0\xff\xff\xffembed_tokens.weight.".to_vec(),
            "wants 4294967280 bytes",
        ),
        (
            // A tensor record with no arguments: candle alone indexes past the tuple and panics.
            "tensor record without arguments",
            [
                &b"\x80\x02}X\x13\x00\x00\x00embed_tokens.weight"[..],
                b"ctorch._utils\n_rebuild_tensor_v2\n)Rs.",
            ]
            .concat(),
            "malformed pickle",
        ),
        ("no STOP", b"\x80\x02}(".to_vec(), "STOP"),
        ("integer too long", b"\x80\x02\x8a\x10".to_vec(), "64 bits"),
    ];
    for (what, pickle, expect) in cases {
        let dir = copy_fixture("gret_pth", "hostile-pickle");
        std::fs::write(dir.join("checkpoint.pth"), pth_with_pickle(&pickle)).unwrap();
        match load_err(dir.path()) {
            Error::Checkpoint(m) => assert!(m.contains(expect), "{what}: {m}"),
            other => panic!("{what}: expected Error::Checkpoint, got {other:?}"),
        }
    }
    // The unmodified pickle still loads through the same path.
    let bytes = std::fs::read(fixture("gret_pth").join("checkpoint.pth")).unwrap();
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
    let mut original = Vec::new();
    for i in 0..archive.len() {
        let mut entry = archive.by_index(i).unwrap();
        if entry.name().unwrap().ends_with("data.pkl") {
            std::io::Read::read_to_end(&mut entry, &mut original).unwrap();
        }
    }
    let dir = copy_fixture("gret_pth", "rewritten-pickle");
    std::fs::write(dir.join("checkpoint.pth"), pth_with_pickle(&original)).unwrap();
    Model::load(dir.path(), &Device::Cpu, DType::F32).unwrap();
}

// ---------------------------------------------------------------------------------------------
// model.gguf: a hand-written GGUF (independent of yoco's writer), then every way it can lie

/// One metadata entry of a hand-written GGUF: key, GGUF value type, the value's bytes.
type GgufMeta = (String, u32, Vec<u8>);
/// One tensor entry: name, dimensions in GGUF order (innermost first), GGUF type, data offset.
type GgufTensor = (String, Vec<u64>, u32, u64);

/// A GGUF file written by hand, field by field as the format lays them out.
#[derive(Clone)]
struct Gguf {
    magic: [u8; 4],
    version: u32,
    /// The counts written in the header (normally the lengths of the lists below).
    counts: Option<(u64, u64)>,
    metadata: Vec<GgufMeta>,
    tensors: Vec<GgufTensor>,
    /// Padding before the data: up to this multiple.
    alignment: u64,
    data: Vec<u8>,
}

fn gguf_string(s: &str) -> Vec<u8> {
    [(s.len() as u64).to_le_bytes().as_slice(), s.as_bytes()].concat()
}

impl Gguf {
    fn bytes(&self) -> Vec<u8> {
        let mut b = self.magic.to_vec();
        b.extend_from_slice(&self.version.to_le_bytes());
        let (nt, nm) = self
            .counts
            .unwrap_or((self.tensors.len() as u64, self.metadata.len() as u64));
        b.extend_from_slice(&nt.to_le_bytes());
        b.extend_from_slice(&nm.to_le_bytes());
        for (key, kind, value) in &self.metadata {
            b.extend_from_slice(&gguf_string(key));
            b.extend_from_slice(&kind.to_le_bytes());
            b.extend_from_slice(value);
        }
        for (name, dims, kind, offset) in &self.tensors {
            b.extend_from_slice(&gguf_string(name));
            b.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                b.extend_from_slice(&d.to_le_bytes());
            }
            b.extend_from_slice(&kind.to_le_bytes());
            b.extend_from_slice(&offset.to_le_bytes());
        }
        while !(b.len() as u64).is_multiple_of(self.alignment) {
            b.push(0);
        }
        b.extend_from_slice(&self.data);
        b
    }

    fn set_meta(&mut self, key: &str, kind: u32, value: Vec<u8>) {
        self.metadata.retain(|(k, _, _)| k != key);
        self.metadata.push((key.to_string(), kind, value));
    }
}

/// `gret` as a GGUF: its params as `yoco.*` metadata (u64 / f64), every tensor in f32 except the
/// projections listed in `q8_0`, quantized by candle; data 32-byte aligned.
fn gret_gguf(q8_0: &[&str]) -> Gguf {
    let formats: Vec<(&str, GgmlDType)> = q8_0.iter().map(|&n| (n, GgmlDType::Q8_0)).collect();
    gret_gguf_with(&formats)
}

/// [`gret_gguf`] with the listed tensors in the listed formats.
fn gret_gguf_with(quantized: &[(&str, GgmlDType)]) -> Gguf {
    let mut metadata = vec![("general.architecture".to_string(), 8, gguf_string("yoco"))];
    for (key, value) in gret_params() {
        let entry = match value.as_u64() {
            Some(u) => (format!("yoco.{key}"), 10, u.to_le_bytes().to_vec()),
            None => (
                format!("yoco.{key}"),
                12,
                value.as_f64().unwrap().to_le_bytes().to_vec(),
            ),
        };
        metadata.push(entry);
    }
    let tensors: BTreeMap<String, Tensor> = gret_tensors().into_iter().collect();
    let (mut entries, mut data) = (Vec::new(), Vec::new());
    for (name, t) in tensors {
        let dims: Vec<u64> = t.dims().iter().rev().map(|&d| d as u64).collect();
        let format = quantized.iter().find(|(n, _)| *n == name).map(|q| q.1);
        let (kind, bytes) = if let Some(format) = format {
            let q = candle_core::quantized::QTensor::quantize(&t, format).unwrap();
            let kind = match format {
                GgmlDType::Q4_0 => 2,
                GgmlDType::Q4_1 => 3,
                GgmlDType::Q5_0 => 6,
                GgmlDType::Q5_1 => 7,
                GgmlDType::Q8_0 => 8,
                other => panic!("no GGUF id written for {other:?}"),
            };
            (kind, q.data().unwrap().to_vec())
        } else {
            let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            (0, v.iter().flat_map(|x| x.to_le_bytes()).collect())
        };
        entries.push((name, dims, kind, data.len() as u64));
        data.extend_from_slice(&bytes);
        while !data.len().is_multiple_of(32) {
            data.push(0);
        }
    }
    Gguf {
        magic: *b"GGUF",
        version: 3,
        counts: None,
        metadata,
        tensors: entries,
        alignment: 32,
        data,
    }
}

/// A directory holding only `model.gguf` with these bytes.
fn dir_with_gguf(test: &str, bytes: &[u8]) -> TempDir {
    let dir = TempDir::new(test);
    std::fs::write(dir.join("model.gguf"), bytes).unwrap();
    dir
}

const GRET_Q8_0: [&str; 2] = [
    "cross_decoder.layers.0.ffn.fc2.weight",
    "output_projection.weight",
];

#[test]
fn hand_written_gguf_loads() {
    // The control for the lying GGUFs below: an f32 GGUF is the safetensors model exactly, and
    // one with two projections in Q8_0 computes what float32 computes with them dequantized.
    let reference = Model::load(fixture("gret"), &Device::Cpu, DType::F32).unwrap();
    let dir = dir_with_gguf("gguf-f32", &gret_gguf(&[]).bytes());
    let model = Model::load(dir.path(), &Device::Cpu, DType::F32).unwrap();
    assert_eq!(model.config(), reference.config());
    assert_eq!(
        max_abs_diff(&logits(&model, 20), &logits(&reference, 20)),
        0.0
    );

    let dir = dir_with_gguf("gguf-q8", &gret_gguf(&GRET_Q8_0).bytes());
    let model = Model::load(dir.path(), &Device::Cpu, DType::F32).unwrap();
    let mut tensors = gret_tensors();
    for name in GRET_Q8_0 {
        let q = candle_core::quantized::QTensor::quantize(
            &tensors[name],
            candle_core::quantized::GgmlDType::Q8_0,
        )
        .unwrap();
        tensors.insert(name.to_string(), q.dequantize(&Device::Cpu).unwrap());
    }
    let dequantized = Model::load(
        dir_with_tensors("gguf-deq", &tensors).path(),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    // The same products but for the input's own quantization: a prompt's rows take the float
    // gemm with the dequantized weights (the same sums, within 1e-5), or, on CPUs with byte dot
    // products, the Q8_0 kernel with the input quantized to 8 bits per block, as every decode
    // step does: measured 0.074 on these logits (at most 12.2 in magnitude), the same for the
    // 20 tokens fed one at a time (which always took that kernel).
    let drift = max_abs_diff(&logits(&model, 20), &logits(&dequantized, 20));
    assert!(drift <= 0.11, "{drift}");
    let formats: Vec<_> = model
        .weights()
        .iter()
        .filter(|w| w.format.is_quantized())
        .map(|w| w.name.as_str())
        .collect();
    assert_eq!(formats.len(), 2);
    for name in GRET_Q8_0 {
        assert!(formats.contains(&name), "{formats:?}");
    }
}

#[test]
fn gguf_rows_of_an_odd_number_of_blocks_in_every_32_block_format() {
    // gret's FFN is 160 wide: 5 blocks of 32, which candle's Q4_1 / Q5_0 / Q5_1 dot products
    // refuse (an assertion in debug builds, found by fuzzing: `cargo test` without --release
    // panics here without yoco's dequantizing path); yoco dequantizes those rows instead. The
    // model must compute what float32 computes with the dequantized weights, on every path.
    let formats = [
        ("self_decoder.layers.0.ffn.fc2.weight", GgmlDType::Q4_1),
        ("self_decoder.layers.1.ffn.fc2.weight", GgmlDType::Q5_0),
        ("cross_decoder.layers.0.ffn.fc2.weight", GgmlDType::Q5_1),
        ("cross_decoder.layers.1.ffn.fc2.weight", GgmlDType::Q4_0),
    ];
    let dir = dir_with_gguf("gguf-odd", &gret_gguf_with(&formats).bytes());
    let mut tensors = gret_tensors();
    for (name, format) in formats {
        let q = candle_core::quantized::QTensor::quantize(&tensors[name], format).unwrap();
        tensors.insert(name.to_string(), q.dequantize(&Device::Cpu).unwrap());
    }
    let reference = Model::load(
        dir_with_tensors("gguf-odd-deq", &tensors).path(),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    let exp = expected("gret");
    let want = logits(&reference, 40);
    for kernels in [yoco::Kernels::Native, yoco::Kernels::Portable] {
        let options = yoco::LoadOptions {
            kernels,
            ..yoco::LoadOptions::default()
        };
        let model = Model::load_with(dir.path(), &options).unwrap();
        // Prompts: dequantized weights in f32 (native kernels), but for the Q4_0 weight on
        // CPUs with byte dot products, whose prompt rows take the decode kernel, and on the
        // portable path, which multiplies it through candle's quantized matmul: both quantize
        // their input (measured 0.033 on a CPU with AVX-512 VNNI), hence the looser bound.
        // (The dequantized rows' products are checked bit for bit by the kernels' own tests.)
        let bound = 0.1;
        let d = max_abs_diff(&logits(&model, 40), &want);
        assert!(d <= bound, "{kernels:?}: {d}");
        // Steps: the decode kernels (Q4_0 there quantizes its input, hence the looser bound).
        let mut cache = model.new_cache(1).unwrap();
        model.forward(&ids(&exp.tokens[..30]), &mut cache).unwrap();
        for t in 30..40 {
            let step = model
                .step(
                    &Tensor::new(&[exp.tokens[t]], &Device::Cpu).unwrap(),
                    &mut cache,
                )
                .unwrap();
            let d = max_abs_diff(
                &step,
                &want.get(0).unwrap().get(t).unwrap().unsqueeze(0).unwrap(),
            );
            assert!(d <= 0.1, "{kernels:?} step {t}: {d}");
        }
    }
}

#[test]
fn lying_gguf_files_are_errors_not_allocations_or_panics() {
    let good = gret_gguf(&GRET_Q8_0);
    let last = good.tensors.len() - 1;
    let file_len = good.bytes().len() as u64;
    fn u64s(v: u64) -> Vec<u8> {
        v.to_le_bytes().to_vec()
    }
    type Edit = Box<dyn Fn(&mut Gguf)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        ("bad magic", Box::new(|g| g.magic = *b"GGML"), "not a GGUF"),
        ("version 1", Box::new(|g| g.version = 1), "version 1"),
        ("version 99", Box::new(|g| g.version = 99), "version 99"),
        (
            "a billion tensors",
            Box::new(|g| g.counts = Some((1 << 30, g.metadata.len() as u64))),
            "tensors",
        ),
        (
            "more tensors than the file can hold",
            Box::new(|g| g.counts = Some((60_000, g.metadata.len() as u64))),
            "truncated",
        ),
        (
            "u64::MAX metadata entries",
            Box::new(|g| g.counts = Some((g.tensors.len() as u64, u64::MAX))),
            "metadata",
        ),
        (
            "an array of 2^40 u8",
            Box::new(move |g| {
                g.set_meta(
                    "junk",
                    9,
                    [0u32.to_le_bytes().to_vec(), u64s(1 << 40)].concat(),
                )
            }),
            "truncated",
        ),
        (
            "arrays nested 6 deep",
            Box::new(move |g| {
                let mut v = Vec::new();
                for _ in 0..6 {
                    v.extend_from_slice(&9u32.to_le_bytes());
                    v.extend_from_slice(&1u64.to_le_bytes());
                }
                v.extend_from_slice(&0u32.to_le_bytes());
                v.extend_from_slice(&0u64.to_le_bytes());
                g.set_meta("junk", 9, v)
            }),
            "nested",
        ),
        (
            "unknown metadata type",
            Box::new(|g| g.set_meta("junk", 77, vec![0; 8])),
            "metadata type 77",
        ),
        (
            "a bool that is 2",
            Box::new(|g| g.set_meta("junk", 7, vec![2])),
            "bool",
        ),
        (
            "duplicate key",
            Box::new(|g| {
                let first = g.metadata[1].clone();
                g.metadata.push(first)
            }),
            "twice",
        ),
        (
            "unknown tensor type",
            Box::new(move |g| g.tensors[last].2 = 99),
            "tensor type 99",
        ),
        (
            "a type yoco does not read (Q8_1)",
            Box::new(move |g| g.tensors[last].2 = 9),
            "tensor type 9",
        ),
        (
            "no dimensions",
            Box::new(move |g| g.tensors[last].1.clear()),
            "0 dimensions",
        ),
        (
            "five dimensions",
            Box::new(move |g| g.tensors[last].1 = vec![1; 5]),
            "5 dimensions",
        ),
        (
            "dimensions whose product overflows",
            Box::new(move |g| g.tensors[last].1 = vec![u64::MAX, u64::MAX]),
            "impossible dimensions",
        ),
        (
            "a zero dimension",
            Box::new(move |g| g.tensors[last].1.push(0)),
            "impossible dimensions",
        ),
        (
            "data past the end of the file",
            Box::new(move |g| g.tensors[last].3 += 1 << 20),
            "past the end",
        ),
        (
            "an offset that wraps around",
            Box::new(move |g| g.tensors[last].3 = u64::MAX - 31),
            "past the end",
        ),
        (
            "an unaligned offset",
            Box::new(move |g| g.tensors[last].3 += 2),
            "alignment",
        ),
        (
            "a shape far larger than the file",
            Box::new(move |g| g.tensors[last].1 = vec![1 << 20, 1 << 20]),
            "past the end",
        ),
        (
            "Q8_0 rows that are not whole blocks",
            Box::new(|g| {
                let i = g
                    .tensors
                    .iter()
                    .position(|t| t.0 == "output_projection.weight")
                    .unwrap();
                g.tensors[i].1 = vec![48, 256];
            }),
            "block",
        ),
        (
            "alignment 0",
            Box::new(|g| g.set_meta("general.alignment", 4, 0u32.to_le_bytes().to_vec())),
            "alignment",
        ),
        (
            "alignment 48",
            Box::new(|g| g.set_meta("general.alignment", 4, 48u32.to_le_bytes().to_vec())),
            "alignment",
        ),
        (
            "alignment as a string",
            Box::new(|g| g.set_meta("general.alignment", 8, gguf_string("32"))),
            "alignment",
        ),
        (
            "duplicate tensor",
            Box::new(|g| {
                let t = g.tensors[0].clone();
                g.tensors.push(t)
            }),
            "twice",
        ),
        (
            "no architecture",
            Box::new(|g| g.metadata.retain(|m| m.0 != "general.architecture")),
            "architecture",
        ),
        (
            "another architecture",
            Box::new(|g| g.set_meta("general.architecture", 8, gguf_string("llama"))),
            "llama",
        ),
        (
            "a config field missing",
            Box::new(|g| g.metadata.retain(|m| m.0 != "yoco.dim")),
            "dim",
        ),
        (
            "a config field of the wrong type",
            Box::new(|g| g.set_meta("yoco.dim", 8, gguf_string("sixty-four"))),
            "config",
        ),
        (
            "an unknown config field",
            Box::new(|g| g.set_meta("yoco.colour", 10, u64s(3))),
            "colour",
        ),
    ];
    for (what, edit, needle) in cases {
        let mut g = good.clone();
        edit(&mut g);
        let dir = dir_with_gguf("lying-gguf", &g.bytes());
        match load_err(dir.path()) {
            Error::Checkpoint(m) => {
                assert!(m.contains("model.gguf"), "{what}: {m}");
                assert!(
                    m.contains(needle),
                    "{what}: `{m}` does not mention `{needle}`"
                );
            }
            other => panic!("{what}: expected Error::Checkpoint, got {other:?}"),
        }
    }

    // A string that claims 2^60 bytes: the first key's length prefix rewritten in the bytes.
    let mut bytes = good.bytes();
    bytes[24..32].copy_from_slice(&(1u64 << 60).to_le_bytes());
    assert_checkpoint_err(
        load_err(dir_with_gguf("long-key", &bytes).path()),
        &["bytes"],
    );

    // Truncated anywhere: in the header, in the metadata, in the tensor list, in the data.
    let bytes = good.bytes();
    for len in [0, 3, 8, 20, 30, 200, 2000, bytes.len() / 2, bytes.len() - 1] {
        let dir = dir_with_gguf("truncated-gguf", &bytes[..len]);
        assert_checkpoint_err(load_err(dir.path()), &["model.gguf"]);
    }
    assert!(file_len > 2000);
}

#[test]
fn gguf_tensors_are_checked_against_the_config() {
    let good = gret_gguf(&GRET_Q8_0);
    // A wrong shape, a missing and an extra tensor: the errors safetensors gives.
    let mut g = good.clone();
    let i = g
        .tensors
        .iter()
        .position(|t| t.0 == "layer_norm.weight")
        .unwrap();
    g.tensors[i].1 = vec![32];
    match load_err(dir_with_gguf("gguf-shape", &g.bytes()).path()) {
        Error::ShapeMismatch { name, .. } => assert_eq!(name, "layer_norm.weight"),
        other => panic!("expected ShapeMismatch, got {other:?}"),
    }
    let mut g = good.clone();
    g.tensors.retain(|t| t.0 != "layer_norm.weight");
    assert!(matches!(
        load_err(dir_with_gguf("gguf-missing", &g.bytes()).path()),
        Error::MissingTensor { .. }
    ));
    let mut g = good.clone();
    let mut extra = g.tensors[i].clone();
    extra.0 = "stray.weight".into();
    g.tensors.push(extra);
    assert!(matches!(
        load_err(dir_with_gguf("gguf-extra", &g.bytes()).path()),
        Error::UnexpectedTensors(_)
    ));
    // An impossible config in the metadata is a config error, as in params.json.
    let mut g = good.clone();
    g.set_meta("yoco.n_layers", 10, 3u64.to_le_bytes().to_vec());
    assert_config_err(
        load_err(dir_with_gguf("gguf-config", &g.bytes()).path()),
        &["n_layers"],
    );
    // A params.json beside the GGUF must say the same.
    let dir = dir_with_gguf("gguf-params", &good.bytes());
    let mut params = gret_params();
    params.insert("dim".into(), serde_json::json!(32));
    std::fs::write(
        dir.join("params.json"),
        serde_json::to_string(&params).unwrap(),
    )
    .unwrap();
    assert_checkpoint_err(load_err(dir.path()), &["params.json", "differ"]);
    // A fused projection whose pieces are partly float and partly quantized: the file is right
    // about each tensor but yoco multiplies them as one.
    let g = gret_gguf(&["cross_decoder.k_proj.weight"]);
    assert_checkpoint_err(
        load_err(dir_with_gguf("gguf-mixed", &g.bytes()).path()),
        &["cross_decoder.v_proj.weight", "fused"],
    );
}

// ---------------------------------------------------------------------------------------------
// Phi-4-mini-flash directories (Hugging Face layout): config.json, safetensors (single or
// sharded), generation_config.json. Built from the `phi4flash/a_l8_w4` fixture.
// ---------------------------------------------------------------------------------------------

const PHI: &str = "phi4flash/a_l8_w4";

fn phi_config() -> serde_json::Map<String, serde_json::Value> {
    let text = std::fs::read_to_string(fixture(PHI).join("config.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn phi_tensors() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(PHI).join("model.safetensors"), &Device::Cpu).unwrap()
}

/// A Phi-4-mini-flash directory with this config and these tensors.
fn phi_dir(
    test: &str,
    config: &serde_json::Map<String, serde_json::Value>,
    tensors: &HashMap<String, Tensor>,
) -> TempDir {
    let dir = TempDir::new(test);
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(config).unwrap(),
    )
    .unwrap();
    candle_core::safetensors::save(tensors, dir.join("model.safetensors")).unwrap();
    dir
}

fn phi_with(test: &str, key: &str, value: serde_json::Value) -> TempDir {
    let mut cfg = phi_config();
    cfg.insert(key.into(), value);
    phi_dir(test, &cfg, &phi_tensors())
}

fn phi_logits(dir: &Path) -> Tensor {
    let model = Model::load(dir, &Device::Cpu, DType::F32).unwrap();
    let mut cache = model.new_cache(1).unwrap();
    model
        .forward(&ids(&[5, 17, 42, 99, 7, 3, 250]), &mut cache)
        .unwrap()
}

fn assert_phi_json_err(err: Error, file: &str, needles: &[&str]) {
    match &err {
        Error::Json { path, message } => {
            assert!(path.ends_with(file), "{}", path.display());
            for n in needles {
                assert!(message.contains(n), "`{message}` does not mention `{n}`");
            }
        }
        other => panic!("expected Error::Json from {file} mentioning {needles:?}, got {other:?}"),
    }
}

#[test]
fn phi4flash_config_forms_that_mean_the_same_model_load_the_same() {
    let base = phi_logits(&fixture(PHI));
    // The per-layer window list the config class writes, `layer_types`, dt_rank spelled out.
    let list = serde_json::json!([null, 4, null, 4, null, null, null, null]);
    let types = serde_json::json!([
        "full_attention",
        "sliding_attention",
        "full_attention",
        "sliding_attention",
        "full_attention",
        "full_attention",
        "full_attention",
        "full_attention"
    ]);
    for (key, value) in [
        ("sliding_window", list),
        ("layer_types", types),
        ("mamba_dt_rank", serde_json::json!("auto")),
        ("mamba_dt_rank", serde_json::json!(4)),
        ("attention_dropout", serde_json::json!(0.0)),
    ] {
        let dir = phi_with("phi-same", key, value);
        let diff = max_abs_diff(&phi_logits(dir.path()), &base);
        assert_eq!(diff, 0.0, "{key}");
    }
}

#[test]
fn phi4flash_configs_that_cannot_be_this_model_are_refused_by_name() {
    for (key, value, needle) in [
        ("num_hidden_layers", serde_json::json!(6), "multiple of 4"),
        (
            "num_key_value_heads",
            serde_json::json!(3),
            "key/value heads",
        ),
        (
            "sliding_window",
            serde_json::json!([4, 4, null, 4, null, null, null, null]),
            "entry 0",
        ),
        (
            "sliding_window",
            serde_json::json!("wide"),
            "sliding_window",
        ),
        (
            "layer_types",
            serde_json::json!(vec!["sliding_attention"; 8]),
            "layer_types",
        ),
        ("mamba_dt_rank", serde_json::json!(7), "mamba_dt_rank"),
        ("mb_per_layer", serde_json::json!(1), "mb_per_layer"),
        ("hidden_size", serde_json::json!(-64), "-64"),
        ("vocab_size", serde_json::json!(1u64 << 40), "vocab_size"),
        (
            "tie_word_embeddings",
            serde_json::json!(false),
            "tie_word_embeddings",
        ),
    ] {
        let dir = phi_with("phi-bad-config", key, value.clone());
        assert_phi_json_err(load_err(dir.path()), "config.json", &[needle]);
    }
    // Another model_type is not taken for Phi-4-mini-flash (nor for YOCO).
    let dir = phi_with("phi-llama", "model_type", serde_json::json!("llama"));
    assert_phi_json_err(load_err(dir.path()), "config.json", &["llama"]);
    // Not JSON at all.
    let dir = phi_with("phi-not-json", "hidden_size", serde_json::json!(64));
    std::fs::write(dir.join("config.json"), "{ \"model_type\": \"phi4flash\", ").unwrap();
    assert!(matches!(load_err(dir.path()), Error::Json { .. }));
}

#[test]
fn phi4flash_tensors_are_checked_by_name_shape_and_dtype() {
    let cfg = phi_config();
    let mut missing = phi_tensors();
    missing.remove("model.layers.4.attn.A_log");
    let err = load_err(phi_dir("phi-missing", &cfg, &missing).path());
    assert!(
        matches!(&err, Error::MissingTensor { name, expected } if name == "model.layers.4.attn.A_log" && expected == &vec![128, 16]),
        "{err:?}"
    );
    let mut wrong = phi_tensors();
    wrong.insert(
        "model.layers.1.attn.Wqkv.bias".into(),
        Tensor::zeros(64, DType::F32, &Device::Cpu).unwrap(),
    );
    let err = load_err(phi_dir("phi-shape", &cfg, &wrong).path());
    assert!(
        matches!(&err, Error::ShapeMismatch { name, .. } if name == "model.layers.1.attn.Wqkv.bias"),
        "{err:?}"
    );
    let mut extra = phi_tensors();
    extra.insert(
        "model.layers.6.attn.Wqkv.weight".into(),
        Tensor::zeros((4, 64), DType::F32, &Device::Cpu).unwrap(),
    );
    let err = load_err(phi_dir("phi-extra", &cfg, &extra).path());
    assert!(
        matches!(&err, Error::UnexpectedTensors(m) if m.contains("layers.6.attn.Wqkv")),
        "{err:?}"
    );
    let mut ints = phi_tensors();
    ints.insert(
        "model.final_layernorm.bias".into(),
        Tensor::zeros(64, DType::I64, &Device::Cpu).unwrap(),
    );
    assert_checkpoint_err(
        load_err(phi_dir("phi-int", &cfg, &ints).path()),
        &["model.final_layernorm.bias", "I64"],
    );
}

#[test]
fn phi4flash_shards_and_mixed_dtypes_load_as_stored() {
    let base = phi_logits(&fixture(PHI));
    let tensors = phi_tensors();
    let dir = TempDir::new("phi-shards");
    std::fs::copy(fixture(PHI).join("config.json"), dir.join("config.json")).unwrap();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut map = serde_json::Map::new();
    for (i, part) in names.chunks(names.len() / 2 + 1).enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", i + 1);
        let shard: HashMap<String, Tensor> = part
            .iter()
            .map(|&n| (n.clone(), tensors[n].clone()))
            .collect();
        candle_core::safetensors::save(&shard, dir.join(&file)).unwrap();
        for &n in part {
            map.insert(n.clone(), serde_json::json!(file));
        }
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": map });
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    assert_eq!(max_abs_diff(&phi_logits(dir.path()), &base), 0.0);

    // bf16 weights with A_log, D and the lambdas kept in f32, as the real checkpoint may
    // store them: each tensor is read in its own dtype.
    let kept_f32 = |n: &str| n.ends_with("A_log") || n.ends_with(".D") || n.contains("lambda_");
    let mixed: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(n, t)| {
            let t = if kept_f32(n) {
                t.clone()
            } else {
                t.to_dtype(DType::BF16).unwrap()
            };
            (n.clone(), t)
        })
        .collect();
    let dir = phi_dir("phi-bf16", &phi_config(), &mixed);
    let got = phi_logits(dir.path());
    let rel = max_abs_diff(&got, &base)
        / base
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
    assert!(
        rel > 0.0 && rel < 0.1,
        "bf16 weights: relative max diff {rel}"
    );
}

#[test]
fn phi4flash_uses_a_stored_lm_head_and_the_tied_embedding_otherwise() {
    let base = phi_logits(&fixture(PHI));
    let mut tensors = phi_tensors();
    let doubled = (&tensors["model.embed_tokens.weight"] * 2.0).unwrap();
    tensors.insert("lm_head.weight".into(), doubled);
    let dir = phi_dir("phi-head", &phi_config(), &tensors);
    let twice = (&base * 2.0).unwrap();
    assert!(max_abs_diff(&phi_logits(dir.path()), &twice) < 1e-4);
}

#[test]
fn phi4flash_generation_config_gives_the_stop_ids() {
    let dir = phi_dir("phi-gen", &phi_config(), &phi_tensors());
    std::fs::write(
        dir.join("generation_config.json"),
        r#"{"bos_token_id": 199999, "eos_token_id": [200020, 199999], "do_sample": true}"#,
    )
    .unwrap();
    let model = Model::load(dir.path(), &Device::Cpu, DType::F32).unwrap();
    let cfg = model.config().as_phi4flash().unwrap();
    assert_eq!(cfg.stop_token_ids, vec![200020, 199999]);
    let gen = yoco::GenerationConfig::default().for_model(&model);
    assert_eq!(gen.stop_tokens, vec![200020, 199999]);
    assert!(gen.suppress_tokens.is_empty());
    for bad in [
        r#"{"eos_token_id": "end"}"#,
        r#"{"eos_token_id": [-1]}"#,
        "[1, 2",
    ] {
        std::fs::write(dir.join("generation_config.json"), bad).unwrap();
        assert_phi_json_err(load_err(dir.path()), "generation_config.json", &[]);
    }
}
