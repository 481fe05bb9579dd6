//! The `tokenizer.json` written by `examples/make_reference_tokenizer.rs` must encode exactly
//! as the reference: tiktoken cl100k_base with YOCO's specials (the `cl100k_im` encoding of
//! `YOCO/yoco/tasks/data/tiktoken_tokenizer.py`), every id shifted by 4.
//!
//! The expected ids come from tiktoken-rs's own `cl100k_base` (its ranks and its split pattern)
//! with YOCO's specials cut out first (`support/tiktoken_reference.rs`), never from the
//! document's pattern, so a pattern that splits differently from tiktoken fails here. These
//! tests run the document under fancy-regex (yoco's `tokenizers` build);
//! `tools/onig-check/` runs the same cases under Oniguruma (the default engine of `tokenizers`
//! and of its Python package), which reads possessive quantifiers and `$` differently.
//!
//! `cargo test --test reference_tokenizer -- --ignored` with `YOCO_TOKENIZER_CORPUS` set to a
//! directory also compares the two on every text file under it.

#[path = "support/cl100k.rs"]
mod cl100k;

#[path = "support/tiktoken_reference.rs"]
mod tiktoken_reference;

use std::path::Path;
use std::sync::OnceLock;

use tiktoken_reference::Reference;
use yoco::Tokenizer;

struct Fixture {
    ours: Tokenizer,
    /// The reference encoding, from tiktoken-rs's own cl100k_base (not from our document).
    reference: Reference,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let json = cl100k::reference_tokenizer_json().unwrap();
        let inner = tokenizers::Tokenizer::from_bytes(json.as_bytes()).unwrap();
        let ours = Tokenizer::from_tokenizers(inner);
        let reference = Reference::new().unwrap();
        Fixture { ours, reference }
    })
}

/// The reference's encoding with every special allowed, ids shifted by the offset.
fn expected(text: &str) -> Vec<u32> {
    fixture().reference.encode(text)
}

fn assert_same(text: &str) {
    let ours = fixture().ours.encode(text, false).unwrap();
    let want = expected(text);
    assert_eq!(ours, want, "encoding differs for {text:?}");
}

const CODE_RUST: &str = r#"use std::collections::HashMap;

/// Counts words.
pub fn count(text: &str) -> HashMap<&str, usize> {
    let mut map = HashMap::new();
    for word in text.split_whitespace() {
        *map.entry(word).or_insert(0) += 1;
    }
    map
}

#[cfg(test)]
mod tests {
	#[test]
	fn it_works() { assert_eq!(super::count("a a b")["a"], 2); }
}
"#;

const CODE_PYTHON: &str = "class Retention(nn.Module):\n    def __init__(self, dim: int, heads: int = 8) -> None:\n        super().__init__()\n        self.scale = dim ** -0.5  # 1/sqrt(d)\n\n    def forward(self, x):\n        if x.ndim != 3:\n            raise ValueError(f\"bad shape {x.shape!r}\")\n        return x @ self.w.T\n\n\n";

const SAMPLES: &[&str] = &[
    "Hello world",
    " Hello world ",
    "You Only Cache Once: Decoder-Decoder Architectures for Language Models.",
    CODE_RUST,
    CODE_PYTHON,
    "héllo wörld — 日本語 🎭",
    "Crème brûlée, naïve façade, Ångström, Øresund, Dvořák, Łódź, İstanbul",
    "東京都の人口は約1400万人です。北京是中国的首都。서울은 한국의 수도입니다.",
    "Emoji: 😀😃😄 👩‍👩‍👧‍👦 🏳️‍🌈 🇫🇷 👍🏽 🎭🧪",
    "Combining marks: e\u{301} a\u{308} n\u{303} \u{1100}\u{1161}\u{11A8} Z\u{351}\u{34D}a\u{36B}l\u{310}g\u{344}o",
    "Привет, мир! Γειά σου Κόσμε! שלום עולם! مرحبا بالعالم! नमस्ते दुनिया!",
    "multiple    spaces     here and\ttabs\t\tand\n\n\nnewlines\r\n\r\nand trailing spaces   ",
    "   leading spaces",
    "\n\n\n",
    " ",
    "\t\t \n \t",
    "12345678 1234567890123 3.14159265 -42 1e-9 0x1F 1,000,000 2024-05-08",
    "don't, I'LL, we've, they're, she'd, I'm, it's, DON'T, We'Ve, y'all'll",
    "Special tokens: <|endoftext|> and <fim_prefix>def f():<fim_suffix>\n<fim_middle>",
    "<s>BOS then </s> EOS, <pad> and <unk> as text",
    "<|endofprompt|> <jupyter_code>print(1)<jupyter_output>1<empty_output>",
    "<|fim_prefix|>a<|fim_middle|>b<|fim_suffix|>c<fim_pad><reponame>r<filename>f<gh_stars>5",
    "<issue_start>x<issue_comment>y<issue_closed><jupyter_start><jupyter_text>t<commit_before>o<commit_msg>m<commit_after>",
    "Unfinished specials: <|endoftext| <fim_prefix <s </s",
    "URLs: https://github.com/microsoft/unilm/tree/master/YOCO?tab=readme#yoco",
    "Mixed: αβγ123abc!!!???...---___===+++***",
    "\u{0}\u{1}\u{7f}\u{80}\u{ff}\u{fffd}\u{10ffff}",
    "",
];

#[test]
fn layout_matches_the_reference_table() {
    let ours = &fixture().ours;
    assert_eq!(ours.vocab_size(), cl100k::VOCAB_SIZE as usize);
    assert_eq!(ours.bos_id(), Some(0));
    assert_eq!(ours.eos_id(), Some(2));
    let inner = ours.inner();
    for (token, id) in cl100k::special_ids() {
        if token != cl100k::ALIASED_SPECIAL {
            assert_eq!(inner.token_to_id(token), Some(id), "{token}");
        }
        if cl100k::SYMBOLS.contains(&token) {
            // Ordinary text in the reference.
            assert_eq!(
                ours.encode(token, false).unwrap(),
                expected(token),
                "{token}"
            );
            assert!(!ours.encode(token, false).unwrap().contains(&id));
        } else {
            assert_eq!(ours.encode(token, false).unwrap(), vec![id], "{token}");
        }
    }
    // Documented ids (see tests/support/cl100k.rs).
    for (token, id) in [
        ("<|endoftext|>", 100_261),
        ("<|fim_suffix|>", 100_264),
        ("<fim_prefix>", 100_268),
        ("<jupyter_code>", 100_280),
        ("<|endofprompt|>", 100_280),
        ("<commit_after>", 100_285),
    ] {
        assert_eq!(ours.encode(token, false).unwrap(), vec![id], "{token}");
    }
    assert_eq!(
        inner.id_to_token(100_280).as_deref(),
        Some("<jupyter_code>")
    );
    assert_eq!(ours.decode(&[100_280], false).unwrap(), "<jupyter_code>");
    assert_eq!(ours.decode(&[100_280], true).unwrap(), "");
    // Every id below the padded size has a token; none above.
    for id in [100_260, 100_265, 100_267, 100_286, 100_287] {
        assert!(inner.id_to_token(id).is_some(), "{id}");
    }
    assert!(inner.id_to_token(cl100k::VOCAB_SIZE).is_none());
    // Shifted byte tokens.
    assert_eq!(ours.encode("!", false).unwrap(), vec![4]);
    assert_eq!(
        ours.encode("hello", false).unwrap(),
        vec![fixture().reference.bpe().encode_ordinary("hello")[0] + 4]
    );
}

#[test]
fn encodes_like_tiktoken() {
    for &text in SAMPLES {
        assert_same(text);
    }
    // Every sample glued to every other, so that the joins meet in new places.
    for (i, a) in SAMPLES.iter().enumerate() {
        let b = SAMPLES[(i + 7) % SAMPLES.len()];
        assert_same(&format!("{a}{b}"));
    }
    assert_same(&SAMPLES.concat());
}

/// Digit runs, numbers after punctuation, whitespace runs, contractions, code, mixed scripts:
/// where a split pattern that is not tiktoken's (or an engine that reads it differently) shows.
#[test]
fn splits_like_tiktoken() {
    let cases = tiktoken_reference::split_cases();
    let mut failures = Vec::new();
    for text in &cases {
        if fixture().ours.encode(text, false).unwrap() != expected(text) {
            failures.push(text.clone());
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ: {failures:?}",
        failures.len(),
        cases.len()
    );
    assert_same(&cases.concat());
}

/// Oniguruma (the `tokenizers` crate's default engine, and the Python package's) reads `X{1,3}+`
/// as "one or more runs of 1-3 X" and `$` as the end of a line, where fancy-regex and tiktoken
/// read a possessive `{1,3}` and the end of the text; the document must use neither.
#[test]
fn pattern_reads_the_same_in_every_engine() {
    let value = cl100k::reference_tokenizer_value().unwrap();
    let pattern = value["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"]
        .as_str()
        .unwrap();
    assert_eq!(pattern, cl100k::CL100K_PATTERN);
    // `\p{L}+` is a class and a greedy `+`, not a possessive `}+`.
    let quantified = pattern.replace(r"\p{L}", "L").replace(r"\p{N}", "N");
    for quantifier in ["?+", "++", "*+", "}+"] {
        assert!(
            !quantified.contains(quantifier),
            "{quantifier} in {pattern}"
        );
    }
    assert!(!pattern.contains('$'), "{pattern}");
}

#[test]
fn bos_is_prepended_and_symbols_skipped() {
    let ours = &fixture().ours;
    let ids = ours.encode("Hello", true).unwrap();
    assert_eq!(ids[0], 0);
    assert_eq!(&ids[1..], expected("Hello").as_slice());

    // Like the reference's decode, skipping specials drops ids 0..3.
    let mut with_symbols = vec![0, 1, 3];
    with_symbols.extend(ours.encode("Hi <s> there", false).unwrap());
    with_symbols.extend([100_261, 2]);
    assert_eq!(ours.decode(&with_symbols, true).unwrap(), "Hi <s> there");
    assert_eq!(
        ours.decode(&with_symbols, false).unwrap(),
        "<s><pad><unk>Hi <s> there<|endoftext|></s>"
    );
}

#[test]
fn decode_inverts_encode() {
    let ours = &fixture().ours;
    for &text in SAMPLES {
        let ids = ours.encode(text, false).unwrap();
        // The reference decodes the shared id 100280 as one of its two tokens; we use
        // `<jupyter_code>`.
        let want = text.replace(cl100k::ALIASED_SPECIAL, cl100k::ALIAS_TARGET);
        assert_eq!(ours.decode(&ids, false).unwrap(), want);

        let mut stream = ours.stream(false);
        let mut streamed = String::new();
        for &id in &ids {
            streamed.extend(stream.step(id).unwrap());
        }
        streamed.extend(stream.finish().unwrap());
        assert_eq!(streamed, want);
    }
}

/// Every cl100k token that is valid UTF-8, glued together in rank order: about 100K tokens,
/// so every merge and most pre-tokenizer paths are exercised on pieces that are not tokens.
#[test]
fn encodes_all_tokens_glued_like_tiktoken() {
    let ranks = cl100k::cl100k_ranks().unwrap();
    let text: String = ranks
        .iter()
        .filter_map(|t| std::str::from_utf8(t).ok())
        .collect();
    let ours = fixture().ours.encode(&text, false).unwrap();
    let want = expected(&text);
    if ours != want {
        let at = ours.iter().zip(&want).take_while(|(a, b)| a == b).count();
        let show = |ids: &[u32]| {
            fixture()
                .ours
                .decode(&ids[at..(at + 8).min(ids.len())], false)
        };
        panic!(
            "first difference at token {at}: ours {:?} vs tiktoken {:?}",
            show(&ours),
            show(&want)
        );
    }
}

fn visit(dir: &Path, files: &mut Vec<std::path::PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            visit(&path, files);
        } else {
            files.push(path);
        }
    }
}

/// Compares encodings on every UTF-8 file under `$YOCO_TOKENIZER_CORPUS` (slow).
#[test]
#[ignore = "needs YOCO_TOKENIZER_CORPUS, a directory of text files"]
fn encodes_corpus_like_tiktoken() {
    let Some(dir) = std::env::var_os("YOCO_TOKENIZER_CORPUS") else {
        eprintln!("YOCO_TOKENIZER_CORPUS not set; nothing to compare");
        return;
    };
    let mut files = Vec::new();
    visit(Path::new(&dir), &mut files);
    files.sort();
    let (mut checked, mut bytes, mut failures) = (0usize, 0usize, Vec::new());
    for path in &files {
        let Ok(text) = std::fs::read_to_string(path) else {
            continue;
        };
        if fixture().ours.encode(&text, false).unwrap() != expected(&text) {
            failures.push(path.display().to_string());
        }
        checked += 1;
        bytes += text.len();
    }
    eprintln!("compared {checked} files, {bytes} bytes");
    assert!(
        failures.is_empty(),
        "{} files differ: {failures:?}",
        failures.len()
    );
}
