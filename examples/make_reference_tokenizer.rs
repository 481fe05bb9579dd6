//! Writes a `tokenizer.json` equivalent to the released YOCO models' tokenizer: tiktoken
//! cl100k_base with YOCO's 18 added specials, every tiktoken id shifted by 4 (ids 0..3 are
//! `<s>`, `<pad>`, `</s>`, `<unk>`), vocabulary padded to 100288. See `tests/support/cl100k.rs`
//! for the id table and how it was established from the reference implementation. The file
//! encodes the same under both regex engines of `tokenizers` (fancy-regex and Oniguruma, the
//! latter also the Python package's).
//!
//! ```text
//! cargo run --release --example make_reference_tokenizer -- [--out PATH]   # default: tokenizer.json
//! ```

#[path = "../tests/support/cl100k.rs"]
mod cl100k;

use std::ffi::OsString;
use std::path::PathBuf;

use clap::builder::TypedValueParser;
use clap::Parser;

/// Writes the released YOCO models' tokenizer (tiktoken cl100k_base, YOCO's specials, ids + 4)
/// as a Hugging Face tokenizer.json, after checking that it loads.
#[derive(Parser)]
#[command(name = "make_reference_tokenizer")]
struct Args {
    /// File to write
    #[arg(long, value_name = "PATH", default_value = "tokenizer.json",
          value_parser = clap::builder::OsStringValueParser::new().try_map(out_path))]
    out: PathBuf,
}

/// A path for `--out`. A name that starts with `-` is refused: it is a mistyped flag far more
/// often than a file name (write `./-name` for such a file).
fn out_path(s: OsString) -> Result<PathBuf, String> {
    match s.as_encoded_bytes().first() {
        None => Err("the path is empty".into()),
        Some(b'-') => Err(format!(
            "`{}` looks like a flag, not a file name (write ./{0} to mean a file)",
            s.to_string_lossy()
        )),
        Some(_) => Ok(PathBuf::from(s)),
    }
}

fn main() -> Result<(), cl100k::BoxError> {
    let out = Args::parse().out;
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
