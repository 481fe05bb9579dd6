//! From a prompt to new tokens: prefill with early exit, then one step per token, with sampling
//! ([`sampling`]) and text ([`tokenizer`]).
//!
//! One decode loop serves every entry point: [`Model::generate`] (one call),
//! [`Model::generate_stream`] (a callback per token that can stop), [`Model::generate_from`]
//! (continue a cache you keep: a system prompt prefilled once and cloned per request), and their
//! batched forms [`Model::generate_batch`], [`Model::generate_batch_stream`] and
//! [`Model::generate_batch_from`]: prompts of different lengths decode together, each with the
//! result it would have alone, and a row that stops leaves the batch at once. The [`Engine`]
//! runs the same rows and the same batch step, with rows joining and leaving all the time.
//!
//! [`Engine`]: crate::Engine

pub(crate) mod batch;
pub(crate) mod chat;
pub(crate) mod engine;
pub(crate) mod prefix;
pub(crate) mod row;
pub(crate) mod sampling;
pub(crate) mod stop;
pub(crate) mod tokenizer;

use std::ops::ControlFlow;
use std::time::Duration;

use candle_core::Tensor;

use crate::cache::Cache;
use crate::model::{Model, DEFAULT_PREFILL_CHUNK};
use crate::{Error, Result};
use batch::DecodeBatch;
use row::{Prefill, Row};
use sampling::{Sampling, TokenLogprobs};
use tokenizer::Tokenizer;

/// `<s>`, `<pad>` and `</s>` in the reference vocabulary (tiktoken ids shifted by 4).
pub const REFERENCE_BOS: u32 = 0;
/// Padding id of the reference vocabulary.
pub const REFERENCE_PAD: u32 = 1;
/// End of sequence in the reference vocabulary.
pub const REFERENCE_EOS: u32 = 2;

/// Settings of one generation.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationConfig {
    /// Most tokens to generate (the stop token, if met, is not counted or returned).
    pub max_new_tokens: usize,
    /// How each token is chosen.
    pub sampling: Sampling,
    /// Generation ends when one of these is chosen. Default: the reference vocabulary's
    /// `</s>` (2); [`GenerationConfig::for_tokenizer`] uses the tokenizer's EOS.
    pub stop_tokens: Vec<u32>,
    /// Ids never generated. Default `[0, 1]` (`<s>`, `<pad>`), as the reference's greedy loop.
    pub suppress_tokens: Vec<u32>,
    /// Seed of the sampler: the same seed gives the same tokens on every run.
    pub seed: u64,
    /// Prompt tokens processed at once during prefill (bounds working memory; in an
    /// [`crate::Engine`], also how long the other sequences wait for a prompt between two
    /// tokens).
    pub prefill_chunk: usize,
    /// Generation ends when the decoded text contains one of these; the stop string and
    /// anything after it are not part of the text, and streamed text is held back while it
    /// could still be the start of one. Needs a tokenizer ([`Model::generate_text`], or an
    /// [`crate::Engine`] with one); empty strings are refused.
    pub stop_strings: Vec<String>,
    /// Log-probabilities: `None` (default) for none, `Some(n)` for the chosen token's and the
    /// `n` most likely tokens' at each step, in [`Generation::logprobs`] and each streamed
    /// [`Token`]. They are of the distribution after the suppressed ids, the repetition
    /// penalty and the temperature, before top-k/top-p/min-p
    /// ([`crate::Sampler::sample_with_logprobs`]).
    pub logprobs: Option<usize>,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        GenerationConfig {
            max_new_tokens: 256,
            sampling: Sampling::default(),
            stop_tokens: vec![REFERENCE_EOS],
            suppress_tokens: vec![REFERENCE_BOS, REFERENCE_PAD],
            seed: 299_792_458,
            prefill_chunk: DEFAULT_PREFILL_CHUNK,
            stop_strings: Vec::new(),
            logprobs: None,
        }
    }
}

impl GenerationConfig {
    /// Greedy decoding of up to `max_new_tokens` tokens, reference defaults otherwise.
    pub fn greedy(max_new_tokens: usize) -> Self {
        GenerationConfig {
            max_new_tokens,
            sampling: Sampling::greedy(),
            ..Default::default()
        }
    }

    /// Stop and suppressed ids taken from a tokenizer: stop at its EOS, never emit its BOS or
    /// its `<pad>`.
    pub fn for_tokenizer(mut self, tokenizer: &Tokenizer) -> Self {
        self.stop_tokens = tokenizer.eos_id().into_iter().collect();
        self.suppress_tokens = tokenizer.bos_id().into_iter().collect();
        if let Some(pad) = tokenizer.inner().token_to_id("<pad>") {
            self.suppress_tokens.push(pad);
        }
        self
    }

    /// Stop and suppressed ids that the model's own files define: for a Phi-4-mini-flash
    /// directory, stop at the `eos_token_id`s of its `generation_config.json` (when it has one)
    /// and suppress nothing, as its reference does. A YOCO model changes nothing. Apply it after
    /// [`GenerationConfig::for_tokenizer`].
    pub fn for_model(mut self, model: &Model) -> Self {
        if let crate::ModelConfig::Phi4Flash(cfg) = model.config() {
            if !cfg.stop_token_ids.is_empty() {
                self.stop_tokens = cfg.stop_token_ids.clone();
            }
            self.suppress_tokens.clear();
        }
        self
    }

    /// Checks every setting; [`Model::generate`] calls it.
    pub fn validate(&self) -> Result<()> {
        self.sampling.validate()?;
        if self.prefill_chunk == 0 {
            return Err(Error::Generation("prefill_chunk must be at least 1".into()));
        }
        if self.stop_strings.iter().any(String::is_empty) {
            return Err(Error::Generation(
                "stop strings must not be empty (an empty one would stop at once)".into(),
            ));
        }
        Ok(())
    }

    /// [`GenerationConfig::validate`], and stop strings only where there is a tokenizer.
    fn validate_for(&self, tokenizer: Option<&Tokenizer>) -> Result<()> {
        self.validate()?;
        if !self.stop_strings.is_empty() && tokenizer.is_none() {
            return Err(Error::Generation(
                "stop strings need a tokenizer: use generate_text, or an Engine with one".into(),
            ));
        }
        Ok(())
    }
}

/// Why a generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// `max_new_tokens` were generated.
    MaxTokens,
    /// This stop token was chosen (it is not part of [`Generation::tokens`]).
    StopToken(u32),
    /// The streaming callback asked to stop.
    Callback,
    /// The decoded text reached `GenerationConfig::stop_strings[i]` (not part of the text).
    StopString(usize),
    /// The sequence was cancelled ([`crate::SequenceHandle::cancel`], a dropped handle, or an
    /// engine shutting down).
    Cancelled,
}

/// A token as a generation chooses it: what a streaming callback and an engine's
/// [`crate::Event::Token`] carry.
#[derive(Clone, Debug, PartialEq)]
pub struct Token {
    /// The token id.
    pub id: u32,
    /// The text this token releases: empty without a tokenizer, and while text is held back
    /// (an incomplete UTF-8 character, or text that could still begin a stop string).
    pub text: String,
    /// Its log-probability and the most likely alternatives, when asked for
    /// ([`GenerationConfig::logprobs`]).
    pub logprobs: Option<TokenLogprobs>,
}

/// The result of a generation.
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    /// The new tokens (not the prompt, not the stop token).
    pub tokens: Vec<u32>,
    /// Why it ended.
    pub stop_reason: StopReason,
    /// Number of prompt tokens.
    pub prompt_tokens: usize,
    /// Of those, how many came from a stored prefix state instead of being prefilled
    /// ([`crate::Engine`]'s prefix cache).
    pub cached_tokens: usize,
    /// Time of the prefill (prompt processing up to the first token's logits).
    pub prefill_time: Duration,
    /// Time from the end of the prefill to the end of the generation (in an engine, the
    /// steps of the whole batch).
    pub decode_time: Duration,
    /// Per token of `tokens`, when [`GenerationConfig::logprobs`] asked for them.
    pub logprobs: Vec<TokenLogprobs>,
    /// The text of `tokens`, up to a stop string (excluded), when generated with a tokenizer.
    pub text: Option<String>,
}

impl Generation {
    /// Prompt tokens processed per second.
    pub fn prefill_tokens_per_s(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_time.as_secs_f64().max(1e-9)
    }

    /// Generated tokens per second after the first (the first comes from the prefill).
    pub fn decode_tokens_per_s(&self) -> f64 {
        let steps = self.tokens.len().saturating_sub(1);
        if steps == 0 {
            return 0.0;
        }
        steps as f64 / self.decode_time.as_secs_f64().max(1e-9)
    }
}

/// Most logits [`Model::prompt_logprobs`] holds at once (64 MB of f32): its chunks are this
/// many values over the vocabulary.
const PROMPT_LOGITS: usize = 16 << 20;

impl Model {
    /// The log-probability of every token of `ids` given the ones before it (the first token has
    /// none: `None`), with the `top` most likely tokens at each position, as [`TokenLogprobs`]
    /// (temperature 1, nothing suppressed). The prompt runs in chunks whose logits are read and
    /// dropped one at a time, so memory stays bounded for long texts (scoring, and `echo` with
    /// `logprobs` in the server).
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use yoco::Model;
    ///
    /// # fn main() -> yoco::Result<()> {
    /// let model = Model::load(concat!(env!("CARGO_MANIFEST_DIR"), "/models/shakespeare"), &Device::Cpu, DType::F32)?;
    /// let lps = model.prompt_logprobs(&[0, 40, 41, 42], 2)?;
    /// assert!(lps[0].is_none() && lps[1..].iter().all(|l| l.as_ref().is_some_and(|l| l.logprob <= 0.0)));
    /// # Ok(()) }
    /// ```
    pub fn prompt_logprobs(&self, ids: &[u32], top: usize) -> Result<Vec<Option<TokenLogprobs>>> {
        if ids.is_empty() {
            return Err(Error::Input("empty token sequence".into()));
        }
        let vocab = self.config().vocab_size().max(1);
        let chunk = (PROMPT_LOGITS / vocab).clamp(1, DEFAULT_PREFILL_CHUNK);
        let mut cache = self.new_cache(1)?;
        let mut out: Vec<Option<TokenLogprobs>> = Vec::with_capacity(ids.len());
        out.push(None);
        let mut start = 0;
        while start + 1 < ids.len() {
            // Positions start..end predict tokens start+1..=end.
            let end = (start + chunk).min(ids.len() - 1);
            let logits: Vec<Vec<f32>> = self
                .all_logits_piece(&ids[start..end], &mut cache)?
                .to_dtype(candle_core::DType::F32)?
                .to_vec2()?;
            for (row, &next) in logits.iter().zip(&ids[start + 1..=end]) {
                out.push(Some(sampling::token_logprobs(row, 1.0, next, top, None)));
            }
            start = end;
        }
        Ok(out)
    }
}

impl Model {
    /// Generates up to `cfg.max_new_tokens` tokens after `prompt`.
    ///
    /// ```
    /// # fn main() -> yoco::Result<()> {
    /// use yoco::{GenerationConfig, Model, StopReason};
    /// let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/models/shakespeare");
    /// let model = Model::load(dir, &candle_core::Device::Cpu, candle_core::DType::F32)?;
    /// let out = model.generate(&[0, 1234, 567], &GenerationConfig::greedy(20))?;
    /// assert!(out.tokens.len() <= 20);
    /// if out.stop_reason == StopReason::MaxTokens {
    ///     assert_eq!(out.tokens.len(), 20);
    /// }
    /// println!("{:?} ({:.1} tokens/s)", out.tokens, out.decode_tokens_per_s());
    /// # Ok(()) }
    /// ```
    pub fn generate(&self, prompt: &[u32], cfg: &GenerationConfig) -> Result<Generation> {
        self.generate_stream(prompt, cfg, |_| ControlFlow::Continue(()))
    }

    /// Like [`Model::generate`], calling `on_token` with each new token as soon as it is
    /// chosen; return `ControlFlow::Break(())` to stop early.
    pub fn generate_stream(
        &self,
        prompt: &[u32],
        cfg: &GenerationConfig,
        on_token: impl FnMut(u32) -> ControlFlow<()>,
    ) -> Result<Generation> {
        let mut cache = self.new_cache(1)?;
        self.generate_from(&mut cache, prompt, cfg, on_token)
    }

    /// Continues the single sequence in `cache` with `prompt` (which may be a user turn after a
    /// system prompt already in the cache), then generates. The cache ends holding the prompt
    /// and every generated token but the last one chosen (which has not been fed back yet).
    pub fn generate_from(
        &self,
        cache: &mut Cache,
        prompt: &[u32],
        cfg: &GenerationConfig,
        mut on_token: impl FnMut(u32) -> ControlFlow<()>,
    ) -> Result<Generation> {
        if cache.batch_size() != 1 {
            return Err(Error::Input(
                "generate_from takes a cache of one sequence".into(),
            ));
        }
        let mut out = self.generate_batch_from(
            std::slice::from_mut(cache),
            &[prompt.to_vec()],
            cfg,
            |_, tok| on_token(tok),
        )?;
        out.pop()
            .ok_or_else(|| Error::Generation("no result for the one prompt".into()))
    }

    /// Generates for several prompts of different lengths at once. Each prompt is prefilled on
    /// its own (prefill is compute-bound), then all rows decode together in one batch (decode is
    /// bound by reading the weights, which a batch shares). Each result equals
    /// [`Model::generate`] of that prompt alone with the same settings (same seed per row).
    pub fn generate_batch(
        &self,
        prompts: &[Vec<u32>],
        cfg: &GenerationConfig,
    ) -> Result<Vec<Generation>> {
        self.generate_batch_stream(prompts, cfg, |_, _| ControlFlow::Continue(()))
    }

    /// Like [`Model::generate_batch`], calling `on_token(row, token)` with each new token of
    /// each row as soon as it is chosen; `ControlFlow::Break(())` stops that row (the others go
    /// on).
    pub fn generate_batch_stream(
        &self,
        prompts: &[Vec<u32>],
        cfg: &GenerationConfig,
        on_token: impl FnMut(usize, u32) -> ControlFlow<()>,
    ) -> Result<Vec<Generation>> {
        let mut caches = prompts
            .iter()
            .map(|_| self.new_cache(1))
            .collect::<Result<Vec<_>>>()?;
        self.generate_batch_from(&mut caches, prompts, cfg, on_token)
    }

    /// The one decode loop: continues sequence `i` (the one-sequence cache `caches[i]`) with
    /// `prompts[i]` and generates for all of them together, calling `on_token(i, token)` as each
    /// token is chosen (`Break` stops row `i`). A row that stops leaves the batch at once and its
    /// cache, like every other, ends holding its prompt and every generated token but the last
    /// one chosen. Each row's result equals [`Model::generate_from`] on its cache alone.
    pub fn generate_batch_from(
        &self,
        caches: &mut [Cache],
        prompts: &[Vec<u32>],
        cfg: &GenerationConfig,
        mut on_token: impl FnMut(usize, u32) -> ControlFlow<()>,
    ) -> Result<Vec<Generation>> {
        self.generate_rows(caches, prompts, cfg, None, |r, tok| on_token(r, tok.id))
    }

    /// What every generate function runs: the prompts prefilled one by one, then one
    /// [`DecodeBatch`] until every row has ended, with text when a tokenizer is given.
    fn generate_rows(
        &self,
        caches: &mut [Cache],
        prompts: &[Vec<u32>],
        cfg: &GenerationConfig,
        tokenizer: Option<&Tokenizer>,
        mut report: impl FnMut(usize, &Token) -> ControlFlow<()>,
    ) -> Result<Vec<Generation>> {
        cfg.validate_for(tokenizer)?;
        if prompts.is_empty() && caches.is_empty() {
            return Ok(Vec::new());
        }
        if caches.len() != prompts.len() {
            return Err(Error::Input(format!(
                "{} caches for {} prompts",
                caches.len(),
                prompts.len()
            )));
        }
        for (cache, prompt) in caches.iter().zip(prompts) {
            if prompt.is_empty() {
                return Err(Error::Input("empty prompt: give at least one token".into()));
            }
            if cache.batch_size() != 1 {
                return Err(Error::Input(
                    "each cache of a batched generation holds one sequence".into(),
                ));
            }
            self.check_room(cache.positions()[0] + prompt.len(), cfg.max_new_tokens)?;
        }

        // Prefill each row on its own: prefill is compute-bound, and rows may start anywhere.
        let mut joining = Vec::with_capacity(prompts.len());
        for (r, (cache, prompt)) in caches.iter_mut().zip(prompts).enumerate() {
            let mut row = Row::new(cfg, prompt, tokenizer.is_some())?;
            let start = cache.positions()[0];
            cache.reserve(start + prompt.len() + cfg.max_new_tokens)?;
            // The cache moves into the batch; a placeholder holds its place until it is back.
            let cache = std::mem::replace(cache, self.new_cache(1)?);
            let mut prefill = Prefill::new(prompt.clone(), 0, cache, cfg.prefill_chunk, None);
            let logits = loop {
                if let Some(logits) = prefill.advance(self)? {
                    break logits;
                }
            };
            row.start(logits, prefill.elapsed());
            joining.push((r as u64, row, prefill.cache));
        }

        // Decode every unfinished row in one batch; rows leave it as they end.
        let mut batch = DecodeBatch::new(true);
        batch.admit(joining)?;
        let mut outs: Vec<Option<Generation>> = vec![None; prompts.len()];
        loop {
            let step = if batch.is_empty() {
                Ok(())
            } else {
                batch.step(self, tokenizer, |r, tok| report(r as usize, tok))
            };
            for done in batch.take_finished() {
                if let Some(e) = done.error {
                    return Err(e);
                }
                let r = done.id as usize;
                if let (Some(slot), Some(cache)) = (caches.get_mut(r), done.cache) {
                    *slot = cache;
                }
                if let Some(out) = outs.get_mut(r) {
                    *out = Some(done.row.out);
                }
            }
            step?;
            if batch.is_empty() {
                break;
            }
        }
        outs.into_iter()
            .map(|o| o.ok_or_else(|| Error::Generation("a row left no result".into())))
            .collect()
    }

    /// Text in, text out: encodes `prompt` (with BOS when the tokenizer has one), generates,
    /// and calls `on_text` with each piece of decoded text as soon as it is complete (multi-byte
    /// characters and merged tokens are never split, and text that could still begin one of
    /// `cfg.stop_strings` is held back until it cannot). Stop and suppressed ids come from
    /// `cfg`; see [`GenerationConfig::for_tokenizer`]. The returned text is
    /// [`Generation::text`], the concatenation of the pieces.
    pub fn generate_text(
        &self,
        tokenizer: &Tokenizer,
        prompt: &str,
        cfg: &GenerationConfig,
        mut on_text: impl FnMut(&str) -> ControlFlow<()>,
    ) -> Result<(String, Generation)> {
        let ids = tokenizer.encode(prompt, true)?;
        let mut cache = self.new_cache(1)?;
        let mut streamed = 0;
        let generation = self
            .generate_rows(
                std::slice::from_mut(&mut cache),
                &[ids],
                cfg,
                Some(tokenizer),
                |_, tok| {
                    if tok.text.is_empty() {
                        return ControlFlow::Continue(());
                    }
                    streamed += tok.text.len();
                    on_text(&tok.text)
                },
            )?
            .pop()
            .ok_or_else(|| Error::Generation("no result for the one prompt".into()))?;
        let text = generation.text.clone().unwrap_or_default();
        if let Some(rest) = text.get(streamed..).filter(|r| !r.is_empty()) {
            let _ = on_text(rest);
        }
        Ok((text, generation))
    }

    /// Prefills `ids` into the one-sequence `cache` in chunks of `chunk` tokens (as
    /// [`Model::prefill_chunked`], with the same result), calling `on_chunk(done, total)` after
    /// each chunk. `ControlFlow::Break(())` stops there: the cache then holds the chunks done
    /// and `None` is returned; otherwise the logits of the last position, `(1, vocab)` f32.
    ///
    /// ```
    /// # fn main() -> yoco::Result<()> {
    /// use std::ops::ControlFlow;
    /// use yoco::Model;
    /// let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/gret");
    /// let model = Model::load(dir, &candle_core::Device::Cpu, candle_core::DType::F32)?;
    /// let mut cache = model.new_cache(1)?;
    /// let mut seen = Vec::new();
    /// let logits = model.prefill_with_progress(&[7; 100], &mut cache, 32, |done, total| {
    ///     seen.push((done, total));
    ///     if done >= 64 { ControlFlow::Break(()) } else { ControlFlow::Continue(()) }
    /// })?;
    /// assert!(logits.is_none());
    /// assert_eq!(seen, [(32, 100), (64, 100)]);
    /// assert_eq!(cache.positions(), &[64]);
    /// # Ok(()) }
    /// ```
    pub fn prefill_with_progress(
        &self,
        ids: &[u32],
        cache: &mut Cache,
        chunk: usize,
        mut on_chunk: impl FnMut(usize, usize) -> ControlFlow<()>,
    ) -> Result<Option<Tensor>> {
        if chunk == 0 {
            return Err(Error::Input("prefill chunk size must be at least 1".into()));
        }
        if ids.is_empty() {
            return Err(Error::Input("empty prompt".into()));
        }
        let start = cache.positions().iter().copied().max().unwrap_or(0);
        cache.reserve(start + ids.len())?;
        let mut done = 0;
        while done < ids.len() {
            let end = (done + chunk).min(ids.len());
            let piece = ids.get(done..end).unwrap_or_default();
            let logits = self.prefill_piece(piece, cache, end == ids.len())?;
            done = end;
            if on_chunk(done, ids.len()).is_break() && done < ids.len() {
                return Ok(None);
            }
            if done == ids.len() {
                return Ok(logits);
            }
        }
        Ok(None)
    }

    fn check_room(&self, prompt_end: usize, max_new: usize) -> Result<()> {
        let limit = self.config().max_positions();
        if prompt_end + max_new > limit {
            return Err(Error::Input(format!(
                "prompt ({prompt_end} positions) plus max_new_tokens ({max_new}) exceeds the position limit {limit}"
            )));
        }
        Ok(())
    }
}
