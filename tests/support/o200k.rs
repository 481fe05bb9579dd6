//! A stand-in for Phi-4-mini-flash's `tokenizer.json`, built from the o200k_base ranks that
//! `tiktoken-rs` embeds (the Phi-4 family's byte-level BPE is o200k_base with its own special
//! tokens), for tests that need the real model's kind of tokenizer without the download.
//!
//! Ids 0..199997 are o200k_base's ranks, the Phi-4 specials sit at their ids, every other id up
//! to 200064 is a placeholder no text encodes to. The split pattern is o200k_base's (it has no
//! possessive quantifiers, so Oniguruma reads it as fancy-regex does).
//!
//! Shared through `#[path = ...] mod o200k;` (next to `mod cl100k;`, whose byte-level helpers it
//! uses).

#![allow(dead_code)]

use serde_json::{json, Map, Value};

use crate::cl100k::{
    added_token, byte_level, byte_level_bpe_document, bytes_to_unicode, derive_merges, insert,
    BoxError,
};

/// Rows of the real model's embedding (o200k's 199998 ranks, specials, padding).
pub const VOCAB_SIZE: u32 = 200_064;

/// The Phi-4-mini family's special tokens at their ids.
pub const PHI4_SPECIALS: [(&str, u32); 5] = [
    ("<|endoftext|>", 199_999),
    ("<|assistant|>", 200_019),
    ("<|end|>", 200_020),
    ("<|user|>", 200_021),
    ("<|system|>", 200_022),
];

/// The token bytes of o200k_base, indexed by rank.
pub fn o200k_ranks() -> Result<Vec<Vec<u8>>, BoxError> {
    let bpe = tiktoken_rs::o200k_base().map_err(|e| format!("tiktoken-rs o200k_base: {e}"))?;
    let mut ranks = Vec::with_capacity(199_998);
    for rank in 0u32.. {
        match bpe.decode_bytes(&[rank]) {
            Ok(bytes) if rank < 199_998 => ranks.push(bytes),
            _ => break,
        }
    }
    if ranks.len() != 199_998 {
        return Err(format!("expected 199998 o200k ranks, found {}", ranks.len()).into());
    }
    Ok(ranks)
}

/// The stand-in as a Hugging Face `tokenizer.json` document.
pub fn phi4_tokenizer_value() -> Result<Value, BoxError> {
    let tokens = o200k_ranks()?;
    let merges = derive_merges(&tokens)?;
    let table = bytes_to_unicode();
    let strings: Vec<String> = tokens.iter().map(|t| byte_level(&table, t)).collect();
    let mut vocab = Map::new();
    let mut used = vec![false; VOCAB_SIZE as usize];
    for (s, rank) in strings.iter().zip(0u32..) {
        insert(&mut vocab, &mut used, s, rank)?;
    }
    let mut added = Vec::new();
    for (content, id) in PHI4_SPECIALS {
        insert(&mut vocab, &mut used, content, id)?;
        added.push(added_token(id, content, false));
    }
    for id in 0..VOCAB_SIZE {
        if !used[id as usize] {
            insert(&mut vocab, &mut used, &format!("<|dummy_{id}|>"), id)?;
        }
    }
    let merges: Vec<Value> = merges
        .iter()
        .map(|&(a, b)| json!([strings[a as usize], strings[b as usize]]))
        .collect();
    Ok(byte_level_bpe_document(
        added,
        Value::Null,
        tiktoken_rs::O200K_BASE_PAT_STR,
        vocab,
        merges,
    ))
}

/// The stand-in as `tokenizer.json` text.
pub fn phi4_tokenizer_json() -> Result<String, BoxError> {
    Ok(serde_json::to_string(&phi4_tokenizer_value()?)?)
}
