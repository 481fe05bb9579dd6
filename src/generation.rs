//! Text generation: prefill with early exit, then one step per token.
//!
//! [`Model::generate`] is the one-call API; [`Model::generate_stream`] calls back on every
//! token and lets the caller stop; [`Model::generate_from`] continues from a cache you keep
//! (a system prompt prefilled once and cloned for each request); [`Model::generate_batch`] runs
//! several prompts of different lengths in one batch, each with the result it would have alone.

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};

use crate::cache::Cache;
use crate::model::{Model, DEFAULT_PREFILL_CHUNK};
use crate::sampling::{Sampler, Sampling};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

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

fn last_row(logits: &Tensor) -> Result<Vec<f32>> {
    Ok(logits.flatten_all()?.to_vec1::<f32>()?)
}

impl Model {
    /// Generates up to `cfg.max_new_tokens` tokens after `prompt`.
    ///
    /// ```no_run
    /// # fn main() -> yoco::Result<()> {
    /// use yoco::{GenerationConfig, Model};
    /// let model = Model::load("models/shakespeare", &candle_core::Device::Cpu, candle_core::DType::F32)?;
    /// let out = model.generate(&[0, 1234, 567], &GenerationConfig::greedy(20))?;
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
        cfg.validate()?;
        if prompt.is_empty() {
            return Err(Error::Input("empty prompt: give at least one token".into()));
        }
        if cache.batch_size() != 1 {
            return Err(Error::Input(
                "generate_from takes a cache of one sequence".into(),
            ));
        }
        let start = cache.positions()[0];
        self.check_room(start + prompt.len(), cfg.max_new_tokens)?;
        let mut sampler =
            Sampler::new(cfg.sampling.clone(), cfg.seed, cfg.suppress_tokens.clone())?;
        cache.reserve(start + prompt.len() + cfg.max_new_tokens)?;

        let t0 = Instant::now();
        let mut logits = self.prefill_chunked(
            &ids_tensor(prompt, &self.device().clone())?,
            cache,
            cfg.prefill_chunk,
        )?;
        let prefill_time = t0.elapsed();

        let t1 = Instant::now();
        let mut history = prompt.to_vec();
        let mut tokens = Vec::new();
        let mut stop_reason = StopReason::MaxTokens;
        while tokens.len() < cfg.max_new_tokens {
            let mut row = last_row(&logits)?;
            let tok = sampler.sample(&mut row, &history)?;
            if cfg.stop_tokens.contains(&tok) {
                stop_reason = StopReason::StopToken(tok);
                break;
            }
            tokens.push(tok);
            history.push(tok);
            if on_token(tok).is_break() {
                stop_reason = StopReason::Callback;
                break;
            }
            if tokens.len() == cfg.max_new_tokens {
                break;
            }
            logits = self.step(&Tensor::new(&[tok], self.device())?, cache)?;
        }
        Ok(Generation {
            tokens,
            stop_reason,
            prompt_tokens: prompt.len(),
            prefill_time,
            decode_time: t1.elapsed(),
        })
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
        cfg.validate()?;
        if prompts.is_empty() {
            return Ok(Vec::new());
        }
        let n = prompts.len();
        let mut caches = Vec::with_capacity(n);
        let mut rows = Vec::with_capacity(n);
        let mut logits = Vec::with_capacity(n);
        for prompt in prompts {
            if prompt.is_empty() {
                return Err(Error::Input("empty prompt in batch".into()));
            }
            self.check_room(prompt.len(), cfg.max_new_tokens)?;
            let mut cache = self.new_cache(1)?;
            cache.reserve(prompt.len() + cfg.max_new_tokens)?;
            let t0 = Instant::now();
            logits.push(last_row(&self.prefill_chunked(
                &ids_tensor(prompt, self.device())?,
                &mut cache,
                cfg.prefill_chunk,
            )?)?);
            caches.push(cache);
            rows.push(Row {
                sampler: Sampler::new(cfg.sampling.clone(), cfg.seed, cfg.suppress_tokens.clone())?,
                history: prompt.clone(),
                out: Generation {
                    tokens: Vec::new(),
                    stop_reason: StopReason::MaxTokens,
                    prompt_tokens: prompt.len(),
                    prefill_time: t0.elapsed(),
                    decode_time: Duration::ZERO,
                },
                done: cfg.max_new_tokens == 0,
            });
        }
        let mut cache = Cache::stack(&caches)?;
        drop(caches);
        let t1 = Instant::now();
        loop {
            let mut next = Vec::with_capacity(n);
            for (row, row_logits) in rows.iter_mut().zip(logits.iter_mut()) {
                if !row.done {
                    let tok = row.sampler.sample(row_logits, &row.history)?;
                    if cfg.stop_tokens.contains(&tok) {
                        row.out.stop_reason = StopReason::StopToken(tok);
                        row.done = true;
                    } else {
                        row.out.tokens.push(tok);
                        row.history.push(tok);
                        row.done = row.out.tokens.len() == cfg.max_new_tokens;
                    }
                    if row.done {
                        row.out.decode_time = t1.elapsed();
                    }
                }
                // Finished rows keep stepping on their last token; their outputs are ignored.
                next.push(row.history.last().copied().unwrap_or(0));
            }
            if rows.iter().all(|r| r.done) {
                break;
            }
            let step = self.step(&Tensor::new(next.as_slice(), self.device())?, &mut cache)?;
            logits = step.to_vec2::<f32>()?;
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

struct Row {
    sampler: Sampler,
    history: Vec<u32>,
    out: Generation,
    done: bool,
}
