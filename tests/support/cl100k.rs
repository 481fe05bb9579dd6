//! Builds the `tokenizer.json` of the released YOCO models from the cl100k_base ranks that
//! `tiktoken-rs` embeds.
//!
//! Shared (through `#[path = ...] mod cl100k;`) by `examples/make_reference_tokenizer.rs` and
//! `tests/reference_tokenizer.rs`, because `tiktoken-rs` is only a dev-dependency.
//!
//! # The reference tokenizer
//!
//! The reference implementation (`microsoft/unilm`, file
//! `YOCO/yoco/tasks/data/tiktoken_tokenizer.py`, class `TiktokenTokenizer`) builds a tiktoken
//! `Encoding` named `cl100k_im` from cl100k_base's pattern and mergeable ranks, with special
//! tokens `{**cl100k_base._special_tokens, "<fim_prefix>": 100264, ..., "<commit_after>": 100281}`.
//! Those numbers are **tiktoken ids, before the offset**: `encode` calls
//! `self._model.encode(s, allowed_special="all")` and only then adds `len(self.symbols)` (= 4,
//! for `<s>`, `<pad>`, `</s>`, `<unk>` at 0..3) to every id. So the final ids are:
//!
//! | final id          | token                                                    |
//! |-------------------|----------------------------------------------------------|
//! | 0, 1, 2, 3        | `<s>` (BOS), `<pad>`, `</s>` (EOS), `<unk>`              |
//! | 4..=100259        | cl100k_base mergeable ranks 0..=100255 (+4)              |
//! | 100260            | unused (tiktoken 100256 has no token)                    |
//! | 100261..=100264   | `<\|endoftext\|>`, `<\|fim_prefix\|>`, `<\|fim_middle\|>`, `<\|fim_suffix\|>` |
//! | 100265..=100267   | unused (tiktoken 100261..=100263 have no token)          |
//! | 100268..=100285   | the 18 YOCO specials, `<fim_prefix>` ... `<commit_after>` |
//! | 100286, 100287    | padding up to a multiple of 8 (`n_words` = 100288)       |
//!
//! The four symbols at 0..3 are not tiktoken special tokens in the reference: they exist only in
//! its id table, so the *text* `<s>` or `</s>` encodes as ordinary text (`<`, `s`, `>`), and
//! decoding drops ids below 4. Here they are plain entries of the BPE vocabulary (found by
//! `token_to_id`, never produced by encoding text); the tiktoken specials (cl100k's and
//! YOCO's) are added special tokens, matched in text as the reference's
//! `allowed_special="all"` does.
//!
//! One collision in the reference: cl100k_base's own `<|endofprompt|>` is tiktoken id 100276,
//! which the YOCO table also gives to `<jupyter_code>`. Both texts therefore encode to final id
//! 100280; decoding 100280 in the reference yields whichever of the two tiktoken's hash map
//! happens to keep. Here it decodes to `<jupyter_code>` (YOCO's own token). A Hugging Face
//! tokenizer cannot give two added tokens one id, so `<jupyter_code>` is the added token and
//! a `Replace` normalizer rewrites the literal `<|endofprompt|>` into `<jupyter_code>` (added
//! tokens marked `normalized` are matched after normalization), which reproduces the
//! reference's encoding exactly.
//!
//! The unused ids get placeholder entries `<|yoco_unused_N|>` in the BPE vocabulary (not added
//! tokens), so that the vocabulary covers 0..100288 while no text ever encodes to them: no
//! merge produces them and the pre-tokenizer never yields such a piece.
//!
//! The BPE model sets `ignore_merges` (a pre-token that is itself a token is taken whole, as
//! tiktoken does) and has one merge per multi-byte token (see [`derive_merges`]).
//! The split pattern is tiktoken's, written without possessive quantifiers so that Oniguruma
//! reads it as fancy-regex does (see [`CL100K_PATTERN`]).
//!
//! `tests/reference_tokenizer.rs` checks the result against tiktoken-rs's own cl100k_base
//! (fancy-regex, yoco's `tokenizers` build), `tools/onig-check/` under Oniguruma; the ignored
//! test `encodes_corpus_like_tiktoken` also agreed on 124 MB of Rust, Python and locale files.

#![allow(dead_code)]

use std::collections::HashMap;
use std::error::Error;

use serde_json::{json, Map, Value};

/// Boxed error of the builder.
pub type BoxError = Box<dyn Error + Send + Sync>;

/// Ids 0..OFFSET are `<s>`, `<pad>`, `</s>`, `<unk>`; tiktoken id `t` is final id `t + OFFSET`.
pub const OFFSET: u32 = 4;

/// The reference pads the vocabulary to a multiple of 8.
pub const VOCAB_SIZE: u32 = 100_288;

/// The four symbols the reference puts before the tiktoken ids.
pub const SYMBOLS: [&str; 4] = ["<s>", "<pad>", "</s>", "<unk>"];

/// cl100k_base's special tokens with their tiktoken ids.
pub const CL100K_SPECIALS: [(&str, u32); 5] = [
    ("<|endoftext|>", 100_257),
    ("<|fim_prefix|>", 100_258),
    ("<|fim_middle|>", 100_259),
    ("<|fim_suffix|>", 100_260),
    ("<|endofprompt|>", 100_276),
];

/// The 18 specials YOCO adds; `YOCO_SPECIALS[i]` has tiktoken id `YOCO_FIRST_ID + i`
/// (final id `YOCO_FIRST_ID + i + OFFSET`).
pub const YOCO_SPECIALS: [&str; 18] = [
    "<fim_prefix>",
    "<fim_middle>",
    "<fim_suffix>",
    "<fim_pad>",
    "<reponame>",
    "<filename>",
    "<gh_stars>",
    "<issue_start>",
    "<issue_comment>",
    "<issue_closed>",
    "<jupyter_start>",
    "<jupyter_text>",
    "<jupyter_code>",
    "<jupyter_output>",
    "<empty_output>",
    "<commit_before>",
    "<commit_msg>",
    "<commit_after>",
];

/// Tiktoken id of `YOCO_SPECIALS[0]`.
pub const YOCO_FIRST_ID: u32 = 100_264;

/// cl100k_base's split pattern, written so that every regex engine reads it as tiktoken does.
///
/// tiktoken's own text is
/// `'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s`.
/// fancy-regex (the engine of yoco's `tokenizers` build, and of tiktoken) reads its
/// possessive quantifiers; Oniguruma (the `tokenizers` crate's default engine, and the Python
/// `tokenizers` package's) reads `\p{N}{1,3}+` as "one or more runs of 1 to 3 digits", so
/// `3.14159` would split `14159` as `14`, `159` instead of tiktoken's `141`, `59`; and it reads
/// `$` as the end of a *line*. This form drops every possessive mark and says `\z` (end of
/// text) for `$`. Neither changes a match here: a possessive quantifier differs from a greedy
/// one only when what follows it fails and backtracking would help, and after `\p{L}++`,
/// `\p{N}{1,3}+` and `[\r\n]*+` nothing follows; `?+` guards a non-letter before `\p{L}+`,
/// so giving it back cannot let `\p{L}+` match; `++` comes before `[\r\n]*`, which cannot
/// fail, so nothing ever backtracks into it; and `\s+` backing off from the end of a
/// whitespace run leaves whitespace after it, never the end of the text. `tests/reference_tokenizer.rs` and
/// `tools/onig-check/` compare both engines with tiktoken-rs.
///
/// The older published cl100k pattern (`...|\s*[\r\n]+|\s+(?!\S)|\s+`) splits differently:
/// whitespace that ends the text is cut after its last line break (`"x\n  "` gives `"\n"`,
/// `"  "` where tiktoken's `\s++$` keeps `"\n  "` whole). It gives the same *ids* only because
/// no all-whitespace cl100k token has anything after its last line break, so BPE cuts there
/// anyway; this form needs no such argument.
pub const CL100K_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s+\z|\s*[\r\n]|\s+(?!\S)|\s";

/// The special token the reference maps to the same id as `<jupyter_code>`.
pub const ALIASED_SPECIAL: &str = "<|endofprompt|>";

/// The token that represents the shared id.
pub const ALIAS_TARGET: &str = "<jupyter_code>";

/// Every special token of the reference with its **final** id (after the offset), in the
/// order of the reference's table: the four symbols, cl100k's specials, YOCO's 18.
/// `<|endofprompt|>` and `<jupyter_code>` both have 100280.
pub fn special_ids() -> Vec<(&'static str, u32)> {
    let mut out: Vec<(&'static str, u32)> = SYMBOLS.iter().copied().zip(0..).collect();
    out.extend(CL100K_SPECIALS.iter().map(|&(s, t)| (s, t + OFFSET)));
    out.extend(YOCO_SPECIALS.iter().copied().zip(YOCO_FIRST_ID + OFFSET..));
    out
}

/// The token bytes of cl100k_base, indexed by tiktoken rank (0..100256).
pub fn cl100k_ranks() -> Result<Vec<Vec<u8>>, BoxError> {
    let bpe = tiktoken_rs::cl100k_base().map_err(|e| format!("tiktoken-rs cl100k_base: {e}"))?;
    let mut ranks = Vec::with_capacity(100_256);
    // The ranks are dense from 0; the first id without a mergeable token ends them (100256).
    for rank in 0u32.. {
        if CL100K_SPECIALS.iter().any(|&(_, id)| id == rank) {
            break;
        }
        match bpe.decode_bytes(&[rank]) {
            Ok(bytes) => ranks.push(bytes),
            Err(_) => break,
        }
    }
    if ranks.len() != 100_256 {
        return Err(format!("expected 100256 cl100k ranks, found {}", ranks.len()).into());
    }
    Ok(ranks)
}

/// GPT-2's byte -> printable character table used by byte-level BPE vocabularies.
pub fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut extra = 0u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let code = if printable {
            u32::from(b)
        } else {
            extra += 1;
            255 + extra
        };
        table[usize::from(b)] = char::from_u32(code).unwrap_or('\0');
    }
    table
}

/// `bytes` in the byte-level alphabet.
pub fn byte_level(table: &[char; 256], bytes: &[u8]) -> String {
    bytes.iter().map(|&b| table[usize::from(b)]).collect()
}

/// tiktoken's byte-pair merge of `piece`, using only the tokens of rank below `max_rank`:
/// repeatedly merge the adjacent pair whose concatenation has the lowest rank (leftmost on
/// ties). Returns the parts.
fn bpe_parts<'p>(ranks: &HashMap<&[u8], u32>, piece: &'p [u8], max_rank: u32) -> Vec<&'p [u8]> {
    let rank_of = |s: &[u8]| ranks.get(s).copied().filter(|&r| r < max_rank);
    // Boundaries: parts are piece[bounds[i]..bounds[i + 1]].
    let mut bounds: Vec<usize> = (0..=piece.len()).collect();
    loop {
        let mut best: Option<(u32, usize)> = None;
        for i in 0..bounds.len().saturating_sub(2) {
            if let Some(r) = rank_of(&piece[bounds[i]..bounds[i + 2]]) {
                if best.is_none_or(|(br, _)| r < br) {
                    best = Some((r, i));
                }
            }
        }
        match best {
            Some((_, i)) => {
                bounds.remove(i + 1);
            }
            None => break,
        }
    }
    bounds.windows(2).map(|w| &piece[w[0]..w[1]]).collect()
}

/// The merges of the equivalent Hugging Face BPE, as pairs of tiktoken ranks, in rank order:
/// for every multi-byte token, the two tokens that tiktoken's BPE (restricted to lower ranks)
/// joins last to build it. This is the standard tiktoken -> HF conversion; every token has
/// exactly one merge and merge priority follows token rank.
pub fn derive_merges(tokens: &[Vec<u8>]) -> Result<Vec<(u32, u32)>, BoxError> {
    let ranks: HashMap<&[u8], u32> = tokens.iter().map(Vec::as_slice).zip(0u32..).collect();
    if ranks.len() != tokens.len() {
        return Err("duplicate token bytes in the ranks".into());
    }
    let mut merges = Vec::with_capacity(tokens.len());
    for (rank, token) in (0u32..).zip(tokens) {
        if token.len() < 2 {
            continue;
        }
        let parts = bpe_parts(&ranks, token, rank);
        match parts.as_slice() {
            [a, b] => merges.push((ranks[a], ranks[b])),
            _ => {
                return Err(format!(
                "token of rank {rank} ({:?}) does not split into two lower-rank tokens: {} parts",
                String::from_utf8_lossy(token),
                parts.len()
            )
                .into())
            }
        }
    }
    Ok(merges)
}

pub fn added_token(id: u32, content: &str, normalized: bool) -> Value {
    json!({
        "id": id,
        "content": content,
        "single_word": false,
        "lstrip": false,
        "rstrip": false,
        "normalized": normalized,
        "special": true,
    })
}

/// Adds `s` with `id` to the vocabulary; fails if either is taken.
pub fn insert(
    vocab: &mut Map<String, Value>,
    used: &mut [bool],
    s: &str,
    id: u32,
) -> Result<(), BoxError> {
    let slot = used
        .get_mut(id as usize)
        .ok_or_else(|| format!("id {id} of {s:?} beyond the vocabulary"))?;
    if *slot || vocab.insert(s.to_string(), json!(id)).is_some() {
        return Err(format!("{s:?} (id {id}) collides with another entry").into());
    }
    *slot = true;
    Ok(())
}

/// The reference tokenizer as a Hugging Face `tokenizer.json` document.
pub fn reference_tokenizer_value() -> Result<Value, BoxError> {
    let tokens = cl100k_ranks()?;
    let merges = derive_merges(&tokens)?;
    let table = bytes_to_unicode();
    let strings: Vec<String> = tokens.iter().map(|t| byte_level(&table, t)).collect();

    let mut vocab = Map::new();
    let mut used = vec![false; VOCAB_SIZE as usize];
    let mut added = Vec::new();
    for (content, id) in special_ids() {
        if content == ALIASED_SPECIAL {
            continue; // handled by the normalizer, see the module docs
        }
        insert(&mut vocab, &mut used, content, id)?;
        // The four symbols are plain vocabulary entries: the reference encodes the text "<s>"
        // as ordinary text.
        if !SYMBOLS.contains(&content) {
            added.push(added_token(id, content, content == ALIAS_TARGET));
        }
    }
    for (s, rank) in strings.iter().zip(0u32..) {
        insert(&mut vocab, &mut used, s, rank + OFFSET)?;
    }
    for id in 0..VOCAB_SIZE {
        if !used[id as usize] {
            insert(&mut vocab, &mut used, &format!("<|yoco_unused_{id}|>"), id)?;
        }
    }

    let merges: Vec<Value> = merges
        .iter()
        .map(|&(a, b)| json!([strings[a as usize], strings[b as usize]]))
        .collect();

    let normalizer = json!({
        "type": "Replace",
        "pattern": { "String": ALIASED_SPECIAL },
        "content": ALIAS_TARGET,
    });
    Ok(byte_level_bpe_document(
        added,
        normalizer,
        CL100K_PATTERN,
        vocab,
        merges,
    ))
}

/// A byte-level BPE `tokenizer.json` as tiktoken's encodings convert: `pattern` splits, the
/// byte-level alphabet maps, `ignore_merges` takes a piece that is a token whole.
pub fn byte_level_bpe_document(
    added: Vec<Value>,
    normalizer: Value,
    pattern: &str,
    vocab: Map<String, Value>,
    merges: Vec<Value>,
) -> Value {
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": { "Regex": pattern },
                    "behavior": "Isolated",
                    "invert": false,
                },
                {
                    "type": "ByteLevel",
                    "add_prefix_space": false,
                    "trim_offsets": true,
                    "use_regex": false,
                },
            ],
        },
        "post_processor": null,
        "decoder": {
            "type": "ByteLevel",
            "add_prefix_space": false,
            "trim_offsets": true,
            "use_regex": false,
        },
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": true,
            "vocab": vocab,
            "merges": merges,
        },
    })
}

/// The reference tokenizer as `tokenizer.json` text.
pub fn reference_tokenizer_json() -> Result<String, BoxError> {
    Ok(serde_json::to_string(&reference_tokenizer_value()?)?)
}
