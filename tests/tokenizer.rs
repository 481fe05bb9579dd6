//! Tests of `yoco::tokenizer` on a small byte-level BPE tokenizer trained in the test.

use std::path::PathBuf;
use std::sync::OnceLock;

use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, TruncationParams};
use yoco::Error;
use yoco::{TextStream, Tokenizer};

/// Seed lines of the training corpus (varied prose, code, numbers, accents and a little CJK).
const SEED: &[&str] = &[
    "The quick brown fox jumps over the lazy dog.",
    "You only cache once: a decoder-decoder architecture for large language models.",
    "The self-decoder produces global key-value caches that the cross-decoder reuses.",
    "Gated retention mixes a decaying state with the current token's key and value.",
    "It was the best of times, it was the worst of times, it was the age of wisdom.",
    "In the beginning the universe was created. This has made a lot of people very angry.",
    "Call me Ishmael. Some years ago, never mind how long precisely, I went to sea.",
    "fn main() { println!(\"hello, world\"); }",
    "    let mut total = 0usize; for x in values.iter() { total += *x; }",
    "def forward(self, x):\n        return self.proj(torch.relu(x))",
    "import numpy as np; a = np.zeros((3, 4), dtype=np.float32)",
    "The café served crème brûlée and a piña colada to the naïve señor.",
    "Über den Wolken muss die Freiheit wohl grenzenlos sein, sagte er müde.",
    "Le cœur a ses raisons que la raison ne connaît point.",
    "El niño comió pan y bebió agua en la mañana fría de invierno.",
    "日本語のテキストも少し含まれています。東京は大きな都市です。",
    "中文文本：今天天气很好，我们去公园散步吧。",
    "Numbers: 1, 2, 3, 42, 1000, 65536, 3.14159, 2.71828 and -17.",
    "Prices rose 12% in 2023; the index closed at 4,769.83 points.",
    "She said: \"Don't worry, we'll be there by 10 o'clock.\"",
    "Hello world! How are you today? I'm fine, thanks for asking.",
    "A large language model predicts the next token from the previous ones.",
    "Key-value caches grow with the number of layers in a standard transformer.",
    "Sliding-window attention keeps only the most recent tokens in memory.",
    "Mathematics: e^{i pi} + 1 = 0, and the sum of 1/n^2 is pi^2/6.",
    "Weather report: sunny with a light breeze, 21°C in the afternoon.",
    "Emoji are rare here: 😀 appears once in this corpus.",
    "The tokenizer splits text into pieces, then merges bytes into tokens.",
    "Greek letters: α, β, γ, δ, ε, λ, μ, π, σ, ω appear in formulas.",
    "Russian: Привет, как дела? Всё хорошо, спасибо.",
];

/// A few hundred lines built from the seed lines.
fn corpus() -> Vec<String> {
    let mut lines = Vec::new();
    for round in 0..10 {
        for (i, line) in SEED.iter().enumerate() {
            lines.push(format!("{line} ({round}.{i})"));
            if (i + round) % 3 == 0 {
                let next = SEED[(i + round + 1) % SEED.len()];
                lines.push(format!("{line} {next}"));
            }
        }
    }
    lines
}

/// A byte-level BPE with `<s>`, `<pad>`, `</s>`, `<unk>` at ids 0..3, trained once.
fn trained() -> &'static tokenizers::Tokenizer {
    static TOK: OnceLock<tokenizers::Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let specials = ["<s>", "<pad>", "</s>", "<unk>"]
            .into_iter()
            .map(|s| AddedToken::from(s, true))
            .collect();
        let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
            .vocab_size(600)
            .min_frequency(2)
            .show_progress(false)
            .special_tokens(specials)
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build()
            .into();
        let mut tok = tokenizers::Tokenizer::new(BPE::default());
        tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        tok.with_decoder(Some(ByteLevel::new(false, true, true)));
        tok.train(&mut trainer, corpus().into_iter()).unwrap();
        tok
    })
}

fn tokenizer() -> Tokenizer {
    Tokenizer::from_tokenizers(trained().clone())
}

const SAMPLES: &[&str] = &[
    "héllo wörld — 日本語 🎭",
    "The quick brown fox jumps over the lazy dog.",
    "fn main() {\n    println!(\"x = {}\", 1 + 2);\n}\n",
    "  leading and trailing spaces   ",
    "tabs\tand\nnew\n\n\nlines",
    "Numbers 12345678 and 3.14159, punctuation!?;:",
    "combining: e\u{301} a\u{308} — Привет 😀🎭🧪 中文",
    "",
];

/// A scratch directory unique to this test process and `name`.
fn scratch(name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("yoco-tokenizer-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn send_sync_clone_debug() {
    fn assert_send_sync<T: Send + Sync + Clone + std::fmt::Debug>() {}
    assert_send_sync::<Tokenizer>();
    let tok = tokenizer();
    let debug = format!("{tok:?}");
    assert!(debug.contains("vocab_size"), "{debug}");
    assert!(
        debug.len() < 200,
        "Debug prints the vocabulary: {} chars",
        debug.len()
    );
}

#[test]
fn special_ids_and_vocab_size() {
    let tok = tokenizer();
    assert_eq!(tok.bos_id(), Some(0));
    assert_eq!(tok.eos_id(), Some(2));
    assert_eq!(tok.vocab_size(), trained().get_vocab_size(true));
    assert!(tok.vocab_size() > 256 + 4, "{}", tok.vocab_size());
}

#[test]
fn encode_decode_round_trip() {
    let tok = tokenizer();
    for &text in SAMPLES {
        let ids = tok.encode(text, false).unwrap();
        assert!(ids.iter().all(|&id| (id as usize) < tok.vocab_size()));
        assert_eq!(tok.decode(&ids, false).unwrap(), text, "ids {ids:?}");
        assert_eq!(tok.decode(&ids, true).unwrap(), text);
    }
}

#[test]
fn bos_and_special_tokens() {
    let tok = tokenizer();
    let plain = tok.encode("hello world", false).unwrap();
    let with_bos = tok.encode("hello world", true).unwrap();
    assert_eq!(with_bos[0], 0);
    assert_eq!(&with_bos[1..], plain.as_slice());
    assert!(!plain.contains(&0) && !plain.contains(&2));

    // Literal special tokens in the text become their ids.
    let ids = tok.encode("<s>hi</s>", false).unwrap();
    assert_eq!(ids.first(), Some(&0));
    assert_eq!(ids.last(), Some(&2));
    assert_eq!(tok.decode(&ids, false).unwrap(), "<s>hi</s>");
    assert_eq!(tok.decode(&ids, true).unwrap(), "hi");
}

#[test]
fn post_processor_and_truncation_are_ignored() {
    let mut inner = trained().clone();
    let processor = TemplateProcessing::builder()
        .try_single("<s> $A </s>")
        .unwrap()
        .special_tokens(vec![("<s>", 0), ("</s>", 2)])
        .build()
        .unwrap();
    inner.with_post_processor(Some(processor));
    inner
        .with_truncation(Some(TruncationParams {
            max_length: 2,
            ..Default::default()
        }))
        .unwrap();
    let tok = Tokenizer::from_tokenizers(inner);
    let reference = tokenizer();
    let text = "a sentence long enough to be truncated";
    let ids = tok.encode(text, false).unwrap();
    assert_eq!(ids, reference.encode(text, false).unwrap());
    assert!(ids.len() > 2);
    let with_bos = tok.encode(text, true).unwrap();
    assert_eq!(with_bos[0], 0);
    assert_eq!(&with_bos[1..], ids.as_slice());
}

/// Feeds `ids` through a stream; returns the chunks (the last one from `finish`, if any).
fn stream_chunks(stream: &mut TextStream<'_>, ids: &[u32]) -> Vec<Option<String>> {
    let mut chunks: Vec<Option<String>> = ids.iter().map(|&id| stream.step(id).unwrap()).collect();
    chunks.push(stream.finish().unwrap());
    chunks
}

#[test]
fn stream_concatenates_to_decode() {
    let tok = tokenizer();
    for &text in SAMPLES {
        for add_bos in [false, true] {
            let mut ids = tok.encode(text, add_bos).unwrap();
            ids.push(2);
            for skip in [false, true] {
                let chunks = stream_chunks(&mut tok.stream(skip), &ids);
                let joined: String = chunks.iter().flatten().map(String::as_str).collect();
                assert_eq!(
                    joined,
                    tok.decode(&ids, skip).unwrap(),
                    "{text:?} skip={skip}"
                );
                for chunk in chunks.iter().flatten() {
                    assert!(!chunk.is_empty());
                    assert!(!chunk.contains('\u{FFFD}'), "chunk {chunk:?} of {text:?}");
                }
                // Valid text is never held back to the end.
                assert_eq!(chunks.last(), Some(&None), "{text:?}");
            }
        }
    }
}

#[test]
fn stream_holds_back_split_characters_only() {
    let tok = tokenizer();
    // 🎭 is absent from the training text, so it is four byte tokens.
    let mask = tok.encode("🎭", false).unwrap();
    assert!(mask.len() >= 2, "🎭 is a single token: {mask:?}");
    let mut ids = tok.encode("ok ", false).unwrap();
    let before = ids.len();
    ids.extend(&mask);
    ids.extend(tok.encode(", then.", false).unwrap());

    let mut stream = tok.stream(false);
    let chunks: Vec<Option<String>> = ids.iter().map(|&id| stream.step(id).unwrap()).collect();
    // "ok " is returned as soon as its ids arrive, trailing space included.
    let head: String = chunks[..before]
        .iter()
        .flatten()
        .map(String::as_str)
        .collect();
    assert_eq!(head, "ok ");
    assert!(chunks[before - 1].is_some());
    // The bytes of 🎭 produce nothing until the last one, which produces the whole character.
    let n = mask.len();
    assert!(
        chunks[before..before + n - 1].iter().all(Option::is_none),
        "{chunks:?}"
    );
    assert_eq!(chunks[before + n - 1].as_deref(), Some("🎭"));
    // Punctuation is not delayed either: every later id yields its text at once.
    assert!(
        chunks[before + n..].iter().all(Option::is_some),
        "{chunks:?}"
    );
    assert_eq!(stream.finish().unwrap(), None);
}

#[test]
fn stream_finish_returns_incomplete_tail() {
    let tok = tokenizer();
    let mask = tok.encode("🎭", false).unwrap();
    let mut ids = tok.encode("end", false).unwrap();
    ids.extend(&mask[..mask.len() - 1]);
    let chunks = stream_chunks(&mut tok.stream(false), &ids);
    let joined: String = chunks.iter().flatten().map(String::as_str).collect();
    assert_eq!(joined, tok.decode(&ids, false).unwrap());
    assert!(
        joined.starts_with("end") && joined.ends_with('\u{FFFD}'),
        "{joined:?}"
    );
    assert!(chunks.last().unwrap().is_some());
}

#[test]
fn from_file_and_model_dir() {
    let dir = scratch("load");
    trained().save(dir.join("tokenizer.json"), false).unwrap();
    let a = Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let b = Tokenizer::from_model_dir(&dir).unwrap();
    let text = SAMPLES[0];
    let expected = tokenizer().encode(text, true).unwrap();
    assert_eq!(a.encode(text, true).unwrap(), expected);
    assert_eq!(b.encode(text, true).unwrap(), expected);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn missing_file_names_the_path() {
    let dir = scratch("missing");
    let path = dir.join("nope.json");
    let err = Tokenizer::from_file(&path).unwrap_err();
    assert!(
        matches!(err, Error::Io { .. } | Error::Tokenizer(_)),
        "{err:?}"
    );
    assert!(err.to_string().contains("nope.json"), "{err}");

    let err = Tokenizer::from_model_dir(&dir).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn invalid_json_is_a_tokenizer_error() {
    let dir = scratch("invalid");
    let path = dir.join("tokenizer.json");
    for bad in [
        "{ this is not json",
        "{\"version\": \"1.0\", \"model\": 3}",
        "",
    ] {
        std::fs::write(&path, bad).unwrap();
        let err = Tokenizer::from_file(&path).unwrap_err();
        assert!(matches!(err, Error::Tokenizer(_)), "{err:?}");
        assert!(err.to_string().contains("tokenizer.json"), "{err}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
