//! Text to token ids and back, around a Hugging Face [`tokenizers::Tokenizer`].
//!
//! The released YOCO models use tiktoken's cl100k_base shifted by 4 ids (`<s>`, `<pad>`, `</s>`,
//! `<unk>` at 0..3); `cargo run --example make_reference_tokenizer` writes an equivalent
//! `tokenizer.json`. Any other `tokenizer.json` works too.
//!
//! ```no_run
//! # fn main() -> yoco::Result<()> {
//! let tok = yoco::Tokenizer::from_model_dir("models/yoco-3b")?;
//! let ids = tok.encode("Hello, world", true)?;
//! let mut stream = tok.stream(true);
//! for &id in &ids {
//!     if let Some(text) = stream.step(id)? {
//!         print!("{text}");
//!     }
//! }
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::path::Path;

use crate::generation::chat::{ChatMessage, ChatTemplate};
use crate::{Error, Result};

/// Names tried, in order, for the beginning-of-sequence token.
const BOS_NAMES: [&str; 3] = ["<s>", "<|begin_of_text|>", "<bos>"];
/// Names tried, in order, for the end-of-sequence token.
const EOS_NAMES: [&str; 3] = ["</s>", "<|endoftext|>", "<eos>"];

/// Other names of special tokens that `decode(.., skip_special = true)` leaves out even when
/// the tokenizer does not mark them special.
const OTHER_SPECIAL_NAMES: [&str; 2] = ["<pad>", "<unk>"];

/// The replacement character that lossy UTF-8 decoding puts in place of incomplete bytes.
const REPLACEMENT: char = '\u{FFFD}';

/// A tokenizer: a [`tokenizers::Tokenizer`] plus the model's BOS and EOS ids.
///
/// Cheap to share across threads (`Send + Sync`); cloning copies the vocabulary.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<u32>,
    eos: Option<u32>,
    /// BOS, EOS, `<pad>` and `<unk>`, left out by `decode` with `skip_special`.
    skipped: Vec<u32>,
    vocab_size: usize,
    /// The directory's chat template (`tokenizer_config.json`), or why it could not be read:
    /// a broken template fails the chat calls, not the tokenizer.
    chat_template: Option<std::result::Result<ChatTemplate, String>>,
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The inner tokenizer would print its whole vocabulary.
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size)
            .field("bos_id", &self.bos)
            .field("eos_id", &self.eos)
            .finish_non_exhaustive()
    }
}

fn tokenizer_error(context: &str, e: impl fmt::Display) -> Error {
    Error::Tokenizer(format!("{context}: {e}"))
}

impl Tokenizer {
    /// Loads a Hugging Face `tokenizer.json`.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] naming the path if the file cannot be read, [`Error::Tokenizer`] naming
    /// the path if it is not a valid tokenizer.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes)
            .map_err(|e| tokenizer_error(&format!("cannot load {}", path.display()), e))?;
        Ok(Self::from_tokenizers(inner))
    }

    /// Loads `dir/tokenizer.json`.
    ///
    /// # Errors
    ///
    /// As [`Tokenizer::from_file`].
    pub fn from_model_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let mut tokenizer = Self::from_file(dir.join("tokenizer.json"))?;
        let config = dir.join("tokenizer_config.json");
        if config.is_file() {
            tokenizer.chat_template = ChatTemplate::from_tokenizer_config(&config)
                .map_err(|e| e.to_string())
                .transpose();
        }
        Ok(tokenizer)
    }

    /// The same tokenizer with `template` as its chat template.
    pub fn with_chat_template(self, template: ChatTemplate) -> Self {
        Tokenizer {
            chat_template: Some(Ok(template)),
            ..self
        }
    }

    /// The chat template of the tokenizer's directory (`tokenizer_config.json`'s
    /// `chat_template`), if it has one; an error if it has one that cannot be used.
    pub fn chat_template(&self) -> Result<Option<&ChatTemplate>> {
        match &self.chat_template {
            None => Ok(None),
            Some(Ok(t)) => Ok(Some(t)),
            Some(Err(e)) => Err(Error::ChatTemplate(e.clone())),
        }
    }

    /// Renders a conversation with the chat template ([`Tokenizer::chat_template`], or the
    /// built-in Phi-4 format [`ChatTemplate::phi4`] when the directory has none) and encodes it;
    /// `add_generation_prompt` opens the assistant's reply. The special tokens the template
    /// writes become their ids; nothing else is added.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>> {
        let builtin;
        let template = match self.chat_template()? {
            Some(t) => t,
            None => {
                builtin = ChatTemplate::phi4();
                &builtin
            }
        };
        let text = template.render(messages, add_generation_prompt)?;
        self.encode(&text, false)
    }

    /// Wraps a tokenizer built in code (or loaded by the caller).
    ///
    /// Padding and truncation settings are removed: a language model needs every token of
    /// its prompt.
    pub fn from_tokenizers(mut inner: tokenizers::Tokenizer) -> Self {
        inner.with_padding(None);
        // Removing truncation cannot fail (only invalid truncation parameters are rejected);
        // if it ever did, the tokenizer is kept as it was.
        let _ = inner.with_truncation(None);
        let find = |names: &[&str]| names.iter().find_map(|n| inner.token_to_id(n));
        let bos = find(&BOS_NAMES);
        let eos = find(&EOS_NAMES);
        let mut skipped: Vec<u32> = bos.into_iter().chain(eos).collect();
        skipped.extend(
            OTHER_SPECIAL_NAMES
                .iter()
                .filter_map(|n| inner.token_to_id(n)),
        );
        let largest = inner.get_vocab(true).into_values().max();
        let vocab_size = largest
            .map_or(0, |id| id as usize + 1)
            .max(inner.get_vocab_size(true));
        Self {
            inner,
            bos,
            eos,
            skipped,
            vocab_size,
            chat_template: None,
        }
    }

    /// The wrapped [`tokenizers::Tokenizer`].
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Encodes `text` into token ids.
    ///
    /// The tokenizer's post-processor adds no special tokens; when `add_bos` is true and the
    /// vocabulary has a BOS token ([`Tokenizer::bos_id`]), it is prepended. The tokenizer's
    /// added tokens written literally in `text` become their ids (for the YOCO tokenizer:
    /// `<|endoftext|>`, `<fim_prefix>`, ..., but not `<s>` or `</s>`, which its reference
    /// encodes as ordinary text).
    ///
    /// # Errors
    ///
    /// [`Error::Tokenizer`] if the tokenizer fails on the text.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| tokenizer_error("encode", e))?;
        let ids = encoding.get_ids();
        let bos = self.bos.filter(|_| add_bos);
        let mut out = Vec::with_capacity(ids.len() + usize::from(bos.is_some()));
        out.extend(bos);
        out.extend_from_slice(ids);
        Ok(out)
    }

    /// Decodes token ids into text.
    ///
    /// With `skip_special`, special tokens are left out: the tokenizer's added special tokens,
    /// and the BOS, EOS, `<pad>` and `<unk>` tokens even where the tokenizer does not mark them
    /// special (the YOCO tokenizer keeps them as plain vocabulary entries, because its
    /// reference encodes the text `<s>` as ordinary text). Ids that have no token in the
    /// vocabulary are left out too (as `tokenizers` does). Bytes that do not form valid UTF-8
    /// become U+FFFD.
    ///
    /// # Errors
    ///
    /// [`Error::Tokenizer`] if the decoder fails.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        let result = if skip_special && ids.iter().any(|id| self.skipped.contains(id)) {
            let kept: Vec<u32> = ids
                .iter()
                .copied()
                .filter(|id| !self.skipped.contains(id))
                .collect();
            self.inner.decode(&kept, true)
        } else {
            self.inner.decode(ids, skip_special)
        };
        result.map_err(|e| tokenizer_error("decode", e))
    }

    /// The beginning-of-sequence token: `<s>`, else `<|begin_of_text|>`, else `<bos>`.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// The end-of-sequence token: `</s>`, else `<|endoftext|>`, else `<eos>`.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// Size of the id space, added tokens included: one more than the largest id in the
    /// vocabulary (equal to the number of tokens when ids have no gaps). Every id the tokenizer
    /// produces is below it. For the released YOCO models' tokenizer this is 100288.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Starts an incremental detokenizer; see [`TextStream`].
    pub fn stream(&self, skip_special: bool) -> TextStream<'_> {
        TextStream {
            tokenizer: self,
            state: DecodeState::new(skip_special),
        }
    }
}

/// Incremental detokenizer: feed ids one at a time, get the text they complete.
///
/// It follows the algorithm of `tokenizers`' `DecodeStream` (`decode_stream`): it decodes a
/// short window of recent ids and returns what the new id adds to the text, holding back only
/// while the text ends in an incomplete UTF-8 sequence (so a character split across byte-level
/// tokens comes out whole; a genuine trailing U+FFFD waits for the next id too) or the new id
/// adds no text. Complete text is never delayed because
/// it ends in punctuation or a space. The returned chunks, followed by
/// [`TextStream::finish`], concatenate to [`Tokenizer::decode`] of all the ids fed.
#[derive(Debug)]
pub struct TextStream<'a> {
    tokenizer: &'a Tokenizer,
    state: DecodeState,
}

impl TextStream<'_> {
    /// Feeds one id; returns the text it completes, or `None` when it completes none yet.
    ///
    /// # Errors
    ///
    /// [`Error::Tokenizer`] if decoding fails, or if the decoder rewrites text it already
    /// returned (not the case for byte-level decoders).
    pub fn step(&mut self, id: u32) -> Result<Option<String>> {
        self.state.step(self.tokenizer, id)
    }

    /// Returns the text still held back (an incomplete UTF-8 sequence at the end, decoded
    /// lossily as U+FFFD), or `None` if there is none. Call it when the ids end.
    ///
    /// # Errors
    ///
    /// As [`TextStream::step`].
    pub fn finish(&mut self) -> Result<Option<String>> {
        self.state.finish(self.tokenizer)
    }
}

/// The state of a [`TextStream`] without the borrow of its tokenizer, for a sequence that lives
/// longer than any one borrow (the engine's); each call is given the tokenizer.
#[derive(Clone, Debug)]
pub(crate) struct DecodeState {
    skip_special: bool,
    /// Recent ids: `ids[..prefix_index]` decode to `prefix`, the rest are not yet returned.
    ids: Vec<u32>,
    /// Text of `ids[..prefix_index]`, already returned; it gives the context the next ids
    /// are decoded in.
    prefix: String,
    prefix_index: usize,
}

impl DecodeState {
    pub(crate) fn new(skip_special: bool) -> Self {
        DecodeState {
            skip_special,
            ids: Vec::new(),
            prefix: String::new(),
            prefix_index: 0,
        }
    }

    /// [`TextStream::step`].
    pub(crate) fn step(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<Option<String>> {
        if self.prefix.is_empty() && !self.ids.is_empty() {
            // Earlier ids produced no text yet; use them as context if they decode cleanly.
            let text = tokenizer.decode(&self.ids, self.skip_special)?;
            if !text.ends_with(REPLACEMENT) {
                self.prefix = text;
                self.prefix_index = self.ids.len();
            }
        }
        self.ids.push(id);
        let text = tokenizer.decode(&self.ids, self.skip_special)?;
        if text.len() > self.prefix.len() && !text.ends_with(REPLACEMENT) {
            self.emit(tokenizer, text).map(Some)
        } else {
            Ok(None)
        }
    }

    /// [`TextStream::finish`].
    pub(crate) fn finish(&mut self, tokenizer: &Tokenizer) -> Result<Option<String>> {
        if self.ids.len() == self.prefix_index {
            return Ok(None);
        }
        let text = tokenizer.decode(&self.ids, self.skip_special)?;
        if text.len() > self.prefix.len() {
            self.emit(tokenizer, text).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Returns the part of `text` (the decoding of `ids`) after `prefix` and moves the window.
    fn emit(&mut self, tokenizer: &Tokenizer, text: String) -> Result<String> {
        let new = text.strip_prefix(self.prefix.as_str()).ok_or_else(|| {
            Error::Tokenizer(format!(
                "stream: decoding changed text already returned (expected prefix {:?}, got {:?})",
                self.prefix, text
            ))
        })?;
        let new = new.to_string();
        let new_prefix_index = self.ids.len() - self.prefix_index;
        self.ids.drain(..self.prefix_index);
        self.prefix = tokenizer.decode(&self.ids, self.skip_special)?;
        self.prefix_index = new_prefix_index;
        Ok(new)
    }
}
