//! Writes a `tokenizer.json` equivalent to the released YOCO models' tokenizer: tiktoken
//! cl100k_base with YOCO's 18 added specials, every tiktoken id shifted by 4 (ids 0..3 are
//! `<s>`, `<pad>`, `</s>`, `<unk>`), vocabulary padded to 100288. See `tests/support/cl100k.rs`
//! for the id table and how it was established from the reference implementation. The file
//! encodes the same under both regex engines of `tokenizers` (fancy-regex and Oniguruma, the
//! latter also the Python package's).
//!
//! ```text
//! cargo run --release --example make_reference_tokenizer -- [OUTPUT]   # default: tokenizer.json
//! ```

#[path = "../tests/support/cl100k.rs"]
mod cl100k;

use std::path::PathBuf;

fn main() -> Result<(), cl100k::BoxError> {
    let out = std::env::args_os()
        .nth(1)
        .map_or_else(|| PathBuf::from("tokenizer.json"), PathBuf::from);
    let json = cl100k::reference_tokenizer_json()?;
    // Check that the document loads before writing it.
    let tok = tokenizers::Tokenizer::from_bytes(json.as_bytes())
        .map_err(|e| format!("the generated tokenizer does not load: {e}"))?;
    std::fs::write(&out, &json).map_err(|e| format!("cannot write {}: {e}", out.display()))?;
    println!(
        "wrote {} ({} bytes, {} tokens)",
        out.display(),
        json.len(),
        tok.get_vocab_size(true)
    );
    Ok(())
}
