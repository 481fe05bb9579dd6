//! The reference `tokenizer.json` (see `tests/support/cl100k.rs`) read by Oniguruma, the regex
//! engine of the `tokenizers` crate's default build and of the Python `tokenizers` package,
//! must encode as tiktoken does. yoco itself builds `tokenizers` with fancy-regex, so its own
//! tests cannot see how Oniguruma reads the split pattern; this separate package (not part of
//! yoco's build) does.
//!
//! ```text
//! cargo test --release --manifest-path tools/onig-check/Cargo.toml
//! ```

#![cfg(test)]

#[path = "../../../tests/support/cl100k.rs"]
mod cl100k;
#[path = "../../../tests/support/o200k.rs"]
mod o200k;
#[path = "../../../tests/support/tiktoken_reference.rs"]
mod tiktoken_reference;

use std::sync::OnceLock;

use serde_json::Value;
use tiktoken_reference::Reference;
use tokenizers::Tokenizer;

/// tiktoken's own cl100k_base split pattern, with possessive quantifiers and `$`.
const TIKTOKEN_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s";

fn document() -> &'static Value {
    static DOC: OnceLock<Value> = OnceLock::new();
    DOC.get_or_init(|| cl100k::reference_tokenizer_value().unwrap())
}

fn reference() -> &'static Reference {
    static REF: OnceLock<Reference> = OnceLock::new();
    REF.get_or_init(|| Reference::new().unwrap())
}

/// The document with `pattern` as its split pattern, loaded by this build of `tokenizers`.
fn load(pattern: &str) -> Tokenizer {
    let mut doc = document().clone();
    doc["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = Value::from(pattern);
    Tokenizer::from_bytes(serde_json::to_vec(&doc).unwrap()).unwrap()
}

/// The document as `make_reference_tokenizer` writes it, loaded by this build of `tokenizers`.
fn ours() -> &'static Tokenizer {
    static OURS: OnceLock<Tokenizer> = OnceLock::new();
    OURS.get_or_init(|| {
        let json = serde_json::to_vec(document()).unwrap();
        Tokenizer::from_bytes(json).unwrap()
    })
}

fn encode(tok: &Tokenizer, text: &str) -> Vec<u32> {
    tok.encode_fast(text, false).unwrap().get_ids().to_vec()
}

/// The texts on which `tok` and the reference disagree.
fn differing(tok: &Tokenizer, texts: &[String]) -> Vec<String> {
    texts
        .iter()
        .filter(|t| encode(tok, t) != reference().encode(t))
        .cloned()
        .collect()
}

#[test]
fn the_document_carries_our_pattern() {
    assert_eq!(
        document()["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"],
        Value::from(cl100k::CL100K_PATTERN)
    );
}

#[test]
fn oniguruma_splits_like_tiktoken() {
    let cases = tiktoken_reference::split_cases();
    let failures = differing(ours(), &cases);
    assert!(
        failures.is_empty(),
        "{} of {} cases differ: {failures:?}",
        failures.len(),
        cases.len()
    );
    // Joined, so that the cases meet in new places.
    let joined: Vec<String> = cases
        .chunks(7)
        .map(|c| c.concat())
        .chain([cases.concat()])
        .collect();
    assert_eq!(differing(ours(), &joined), Vec::<String>::new());
}

/// Every cl100k token that is valid UTF-8, glued together in rank order.
#[test]
fn oniguruma_encodes_all_tokens_glued_like_tiktoken() {
    let text: String = cl100k::cl100k_ranks()
        .unwrap()
        .iter()
        .filter_map(|t| std::str::from_utf8(t).ok())
        .collect();
    let ours = encode(ours(), &text);
    let want = reference().encode(&text);
    let at = ours.iter().zip(&want).take_while(|(a, b)| a == b).count();
    assert!(
        ours == want,
        "first difference at token {at}: ours {:?} vs tiktoken {:?}",
        ours.get(at..(at + 8).min(ours.len())),
        want.get(at..(at + 8).min(want.len()))
    );
}

/// The check bites (and this build really reads patterns with Oniguruma: fancy-regex would
/// split as tiktoken does): tiktoken's own possessive pattern splits digit runs differently,
/// which is the bug the document's pattern avoids; and so does that pattern with only the
/// possessive marks dropped, because Oniguruma's `$` also matches before a line break.
#[test]
fn oniguruma_misreads_tiktokens_pattern() {
    let bpe = reference().bpe();
    let pieces = |ids: Vec<u32>| -> Vec<String> {
        ids.into_iter()
            .map(|id| bpe.decode(&[id - cl100k::OFFSET]).unwrap())
            .collect()
    };
    let possessive = load(TIKTOKEN_PATTERN);
    assert_eq!(
        pieces(reference().encode("3.14159")),
        ["3", ".", "141", "59"]
    );
    assert_eq!(
        pieces(encode(&possessive, "3.14159")),
        ["3", ".", "14", "159"]
    );
    assert_ne!(
        encode(&possessive, "v1.2.3456"),
        reference().encode("v1.2.3456")
    );

    let greedy = TIKTOKEN_PATTERN
        .replace("?+", "?")
        .replace("++", "+")
        .replace("*+", "*")
        .replace("{1,3}+", "{1,3}");
    assert!(greedy.contains(r"\s+$"), "{greedy}");
    let dollar = load(&greedy);
    assert_eq!(pieces(reference().encode("a \nb")), ["a", " \n", "b"]);
    assert_eq!(pieces(encode(&dollar, "a \nb")), ["a", " ", "\n", "b"]);
    // With `\z` for `$` it is the document's pattern.
    assert_eq!(greedy.replace('$', r"\z"), cl100k::CL100K_PATTERN);
}

/// The Phi-4 tokenizer stand-in (o200k_base and Phi-4's specials, `tests/support/o200k.rs`) read
/// by Oniguruma encodes as tiktoken's o200k_base: its split pattern has no possessive
/// quantifiers, so both engines read it alike.
#[test]
fn the_phi4_stand_in_encodes_as_tiktoken_o200k_under_oniguruma() {
    let json = o200k::phi4_tokenizer_json().unwrap();
    let tok = Tokenizer::from_bytes(json.as_bytes()).unwrap();
    let bpe = tiktoken_rs::o200k_base().unwrap();
    let mut texts = tiktoken_reference::split_cases();
    texts.push("北京是中国的首都。東京は日本の首都です。They're here; we'll see.".to_string());
    for text in &texts {
        let want: Vec<u32> = bpe.encode_ordinary(text);
        assert_eq!(encode(&tok, text), want, "{text:?}");
    }
    for (special, id) in o200k::PHI4_SPECIALS {
        assert_eq!(encode(&tok, special), vec![id], "{special}");
    }
}
