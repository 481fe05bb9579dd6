//! One sequence of a generation, the same wherever it runs (the decode loop behind
//! [`crate::Model::generate`] and the [`crate::Engine`]): its prompt being prefilled chunk by
//! chunk ([`Prefill`]), then its choices ([`Row`]): sampling, stop ids, stop strings, logprobs
//! and the text released so far.

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use candle_core::Tensor;

use super::sampling::Sampler;
use super::stop::StopText;
use super::tokenizer::{DecodeState, Tokenizer};
use super::{Generation, GenerationConfig, StopReason, Token, TokenLogprobs};
use crate::cache::Cache;
use crate::model::Model;
use crate::{Error, Result};

/// A prompt on its way into a one-sequence cache, one chunk at a time.
pub(crate) struct Prefill {
    ids: Vec<u32>,
    /// Tokens of `ids` already in the cache (a reused prefix counts).
    done: usize,
    chunk: usize,
    /// A chunk ends exactly here (the end of a prefix whose state is kept).
    boundary: Option<usize>,
    pub(crate) cache: Cache,
    elapsed: Duration,
}

impl Prefill {
    /// Prefills `ids[done..]` into `cache` (which holds `ids[..done]` already) in chunks of
    /// `chunk`, one chunk also ending at `boundary` when it lies ahead.
    pub(crate) fn new(
        ids: Vec<u32>,
        done: usize,
        cache: Cache,
        chunk: usize,
        boundary: Option<usize>,
    ) -> Self {
        Prefill {
            ids,
            done,
            chunk: chunk.max(1),
            boundary: boundary.filter(|&b| b > done),
            cache,
            elapsed: Duration::ZERO,
        }
    }

    /// `(done, total)` prompt tokens.
    pub(crate) fn progress(&self) -> (usize, usize) {
        (self.done, self.ids.len())
    }

    /// The prompt.
    pub(crate) fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Time spent in [`Prefill::advance`].
    pub(crate) fn elapsed(&self) -> Duration {
        self.elapsed
    }

    /// True right after the chunk that ended at the boundary.
    pub(crate) fn at_boundary(&self) -> bool {
        self.boundary == Some(self.done) && self.done < self.ids.len()
    }

    /// Runs the next chunk; returns the last position's logits once the prompt is complete.
    pub(crate) fn advance(&mut self, model: &Model) -> Result<Option<Vec<f32>>> {
        let t0 = Instant::now();
        let total = self.ids.len();
        let mut end = (self.done + self.chunk).min(total);
        if let Some(b) = self.boundary.filter(|&b| b > self.done && b < end) {
            end = b;
        }
        let piece = self
            .ids
            .get(self.done..end)
            .ok_or_else(|| Error::Input("prefill past the end of the prompt".into()))?;
        let last = end == total;
        let logits = model.prefill_piece(piece, &mut self.cache, last)?;
        self.done = end;
        let out = match (last, logits) {
            (true, Some(l)) => Some(flat(&l)?),
            (true, None) => return Err(Error::Input("no logits at the end of a prompt".into())),
            (false, _) => None,
        };
        self.elapsed += t0.elapsed();
        Ok(out)
    }
}

/// A row of logits as a host vector.
pub(crate) fn flat(logits: &Tensor) -> Result<Vec<f32>> {
    Ok(logits.flatten_all()?.to_vec1::<f32>()?)
}

/// A token [`Row::draw`] chose, with its log-probabilities when they were asked for.
pub(crate) type Drawn = (u32, Option<TokenLogprobs>);

/// One decoding sequence: what chooses its tokens and decides when it ends.
pub(crate) struct Row {
    cfg: GenerationConfig,
    sampler: Sampler,
    /// Prompt and generated tokens, for the repetition penalty.
    history: Vec<u32>,
    /// The logits the next token is chosen from.
    logits: Vec<f32>,
    pub(crate) out: Generation,
    text: Option<RowText>,
    decode_start: Instant,
}

/// The text of a row: decoded as it comes, held back while it could begin a stop string.
struct RowText {
    decode: DecodeState,
    stops: StopText,
    released: String,
}

impl Row {
    /// A row for `prompt` under `cfg`, decoding text when `with_text` (a tokenizer will be
    /// given to every call).
    pub(crate) fn new(cfg: &GenerationConfig, prompt: &[u32], with_text: bool) -> Result<Self> {
        let sampler = Sampler::new(cfg.sampling.clone(), cfg.seed, cfg.suppress_tokens.clone())?;
        Ok(Row {
            cfg: cfg.clone(),
            sampler,
            history: prompt.to_vec(),
            logits: Vec::new(),
            out: Generation {
                tokens: Vec::new(),
                stop_reason: StopReason::MaxTokens,
                prompt_tokens: prompt.len(),
                cached_tokens: 0,
                prefill_time: Duration::ZERO,
                decode_time: Duration::ZERO,
                logprobs: Vec::new(),
                text: None,
            },
            text: with_text.then(|| RowText {
                decode: DecodeState::new(true),
                stops: StopText::new(&cfg.stop_strings),
                released: String::new(),
            }),
            decode_start: Instant::now(),
        })
    }

    /// The prompt is in: the first token will be chosen from `logits`.
    pub(crate) fn start(&mut self, logits: Vec<f32>, prefill_time: Duration) {
        self.logits = logits;
        self.out.prefill_time = prefill_time;
        self.decode_start = Instant::now();
    }

    /// The logits of the next step.
    pub(crate) fn set_logits(&mut self, logits: Vec<f32>) {
        self.logits = logits;
    }

    /// Draws the next token, touching nothing but this row (rows of a batch draw in parallel):
    /// the token and its log-probabilities when asked for, or `None` when the row has all its
    /// tokens (then [`Row::accept`] is not called).
    pub(crate) fn draw(&mut self) -> Result<Option<Drawn>> {
        if self.out.tokens.len() >= self.cfg.max_new_tokens {
            return Ok(None);
        }
        Ok(Some(match self.cfg.logprobs {
            Some(top) => {
                let (id, lp) =
                    self.sampler
                        .sample_with_logprobs(&mut self.logits, &self.history, top)?;
                (id, Some(lp))
            }
            None => (self.sampler.sample(&mut self.logits, &self.history)?, None),
        }))
    }

    /// Records and reports the token [`Row::draw`] gave; `Some` when the row goes on and must
    /// be fed that token, `None` when it has finished (its stop reason recorded).
    pub(crate) fn accept(
        &mut self,
        (id, logprobs): Drawn,
        tokenizer: Option<&Tokenizer>,
        report: impl FnOnce(&Token) -> ControlFlow<()>,
    ) -> Result<Option<u32>> {
        if self.cfg.stop_tokens.contains(&id) {
            self.out.stop_reason = StopReason::StopToken(id);
            return Ok(None);
        }
        self.out.tokens.push(id);
        self.history.push(id);
        if let Some(lp) = &logprobs {
            self.out.logprobs.push(lp.clone());
        }
        let (text, stopped) = match (&mut self.text, tokenizer) {
            (Some(t), Some(tokenizer)) => {
                let piece = t.decode.step(tokenizer, id)?.unwrap_or_default();
                let (text, stopped) = t.stops.push(&piece);
                t.released.push_str(&text);
                (text, stopped)
            }
            _ => (String::new(), None),
        };
        let flow = report(&Token { id, text, logprobs });
        if let Some(which) = stopped {
            self.out.stop_reason = StopReason::StopString(which);
            return Ok(None);
        }
        if flow.is_break() {
            self.out.stop_reason = StopReason::Callback;
            return Ok(None);
        }
        // The last token is returned, not fed back.
        Ok((self.out.tokens.len() < self.cfg.max_new_tokens).then_some(id))
    }

    /// The row has ended: records its decode time and text, and returns the text held back
    /// until now (an incomplete character, or the start of a stop string that never came).
    pub(crate) fn finish(&mut self, tokenizer: Option<&Tokenizer>) -> Result<String> {
        self.out.decode_time = self.decode_start.elapsed();
        let (Some(t), Some(tokenizer)) = (&mut self.text, tokenizer) else {
            return Ok(String::new());
        };
        let mut tail = String::new();
        if !matches!(self.out.stop_reason, StopReason::StopString(_)) {
            let rest = t.decode.finish(tokenizer)?.unwrap_or_default();
            let (text, stopped) = t.stops.push(&rest);
            tail.push_str(&text);
            match stopped {
                Some(which) => self.out.stop_reason = StopReason::StopString(which),
                None => tail.push_str(&t.stops.flush()),
            }
        }
        t.released.push_str(&tail);
        self.out.text = Some(t.released.clone());
        Ok(tail)
    }
}
