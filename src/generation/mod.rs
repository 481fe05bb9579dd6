//! From a prompt to new tokens: prefill with early exit, then one step per token, with sampling
//! ([`sampling`]) and text ([`tokenizer`]).
//!
//! One decode loop serves every entry point: [`Model::generate`] (one call),
//! [`Model::generate_stream`] (a callback per token that can stop), [`Model::generate_from`]
//! (continue a cache you keep: a system prompt prefilled once and cloned per request), and their
//! batched forms [`Model::generate_batch`], [`Model::generate_batch_stream`] and
//! [`Model::generate_batch_from`]: prompts of different lengths decode together, each with the
//! result it would have alone, and a row that stops leaves the batch at once.

pub(crate) mod sampling;
pub(crate) mod tokenizer;

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};

use crate::cache::Cache;
use crate::model::{Model, DEFAULT_PREFILL_CHUNK};
use crate::{Error, Result};
use sampling::{Sampler, Sampling};
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
    /// Prompt tokens processed at once during prefill (bounds working memory).
    pub prefill_chunk: usize,
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

    /// Checks every setting; [`Model::generate`] calls it.
    pub fn validate(&self) -> Result<()> {
        self.sampling.validate()?;
        if self.prefill_chunk == 0 {
            return Err(Error::Generation("prefill_chunk must be at least 1".into()));
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
}

/// The result of a generation.
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    /// The new tokens (not the prompt, not the stop token).
    pub tokens: Vec<u32>,
    /// Why it ended.
    pub stop_reason: StopReason,
    /// Number of prompt tokens prefilled.
    pub prompt_tokens: usize,
    /// Time of the prefill (prompt processing up to the first token's logits).
    pub prefill_time: Duration,
    /// Time of all decode steps after the prefill, sampling included.
    pub decode_time: Duration,
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

fn ids_tensor(ids: &[u32], device: &Device) -> Result<Tensor> {
    Ok(Tensor::new(ids, device)?.unsqueeze(0)?)
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
        cfg.validate()?;
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
        let mut rows = Vec::with_capacity(prompts.len());
        for (cache, prompt) in caches.iter_mut().zip(prompts) {
            let sampler =
                Sampler::new(cfg.sampling.clone(), cfg.seed, cfg.suppress_tokens.clone())?;
            let start = cache.positions()[0];
            cache.reserve(start + prompt.len() + cfg.max_new_tokens)?;
            let t0 = Instant::now();
            let logits = self.prefill_chunked(
                &ids_tensor(prompt, self.device())?,
                cache,
                cfg.prefill_chunk,
            )?;
            rows.push(Row {
                sampler,
                history: prompt.clone(),
                logits: logits.flatten_all()?.to_vec1::<f32>()?,
                out: Generation {
                    tokens: Vec::new(),
                    stop_reason: StopReason::MaxTokens,
                    prompt_tokens: prompt.len(),
                    prefill_time: t0.elapsed(),
                    decode_time: Duration::ZERO,
                },
            });
        }

        // Decode every unfinished row in one batch; `active[j]` is the row in batch slot j.
        let mut active: Vec<usize> = (0..rows.len()).collect();
        let mut batch = match &*caches {
            [one] => one.clone(),
            many => Cache::stack(many)?,
        };
        let t1 = Instant::now();
        while !active.is_empty() {
            let mut next = Vec::with_capacity(active.len());
            let mut stay = Vec::with_capacity(active.len());
            for (slot, &r) in active.iter().enumerate() {
                let row = &mut rows[r];
                match row.choose(cfg, |tok| on_token(r, tok))? {
                    Some(tok) => {
                        next.push(tok);
                        stay.push(slot);
                    }
                    None => row.out.decode_time = t1.elapsed(),
                }
            }
            if stay.len() < active.len() {
                // Finished rows leave the batch: their state goes back to their caches.
                for (slot, &r) in active.iter().enumerate() {
                    if !stay.contains(&slot) {
                        caches[r] = batch.select(&[slot])?;
                    }
                }
                if stay.is_empty() {
                    break;
                }
                batch = batch.select(&stay)?;
                active = stay.iter().map(|&slot| active[slot]).collect();
            }
            let logits = self.step_ids(&next, &mut batch)?.to_vec2::<f32>()?;
            for (&r, row_logits) in active.iter().zip(logits) {
                rows[r].logits = row_logits;
            }
        }
        Ok(rows.into_iter().map(|r| r.out).collect())
    }

    /// Text in, text out: encodes `prompt` (with BOS when the tokenizer has one), generates,
    /// and calls `on_text` with each piece of decoded text as soon as it is complete (multi-byte
    /// characters and merged tokens are never split). Stop and suppressed ids come from `cfg`;
    /// see [`GenerationConfig::for_tokenizer`].
    pub fn generate_text(
        &self,
        tokenizer: &Tokenizer,
        prompt: &str,
        cfg: &GenerationConfig,
        mut on_text: impl FnMut(&str) -> ControlFlow<()>,
    ) -> Result<(String, Generation)> {
        let ids = tokenizer.encode(prompt, true)?;
        let mut stream = tokenizer.stream(true);
        let mut text = String::new();
        let mut failure = None;
        let generation = self.generate_stream(&ids, cfg, |tok| match stream.step(tok) {
            Ok(Some(piece)) => {
                text.push_str(&piece);
                on_text(&piece)
            }
            Ok(None) => ControlFlow::Continue(()),
            Err(e) => {
                failure = Some(e);
                ControlFlow::Break(())
            }
        })?;
        if let Some(e) = failure {
            return Err(e);
        }
        if let Some(rest) = stream.finish()? {
            text.push_str(&rest);
            let _ = on_text(&rest);
        }
        Ok((text, generation))
    }

    fn check_room(&self, prompt_end: usize, max_new: usize) -> Result<()> {
        let limit = self.config().max_positions;
        if prompt_end + max_new > limit {
            return Err(Error::Input(format!(
                "prompt ({prompt_end} positions) plus max_new_tokens ({max_new}) exceeds the position limit {limit}"
            )));
        }
        Ok(())
    }
}

/// One sequence of a generation.
struct Row {
    sampler: Sampler,
    /// Prompt and generated tokens, for the repetition penalty.
    history: Vec<u32>,
    /// The logits the next token is chosen from.
    logits: Vec<f32>,
    out: Generation,
}

impl Row {
    /// Chooses the next token; `Some` when the row goes on and must be fed that token, `None`
    /// when it has finished (its stop reason recorded).
    fn choose(
        &mut self,
        cfg: &GenerationConfig,
        on_token: impl FnOnce(u32) -> ControlFlow<()>,
    ) -> Result<Option<u32>> {
        if self.out.tokens.len() >= cfg.max_new_tokens {
            return Ok(None);
        }
        let tok = self.sampler.sample(&mut self.logits, &self.history)?;
        if cfg.stop_tokens.contains(&tok) {
            self.out.stop_reason = StopReason::StopToken(tok);
            return Ok(None);
        }
        self.out.tokens.push(tok);
        self.history.push(tok);
        if on_token(tok).is_break() {
            self.out.stop_reason = StopReason::Callback;
            return Ok(None);
        }
        // The last token is returned, not fed back.
        Ok((self.out.tokens.len() < cfg.max_new_tokens).then_some(tok))
    }
}
