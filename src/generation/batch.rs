//! The decode batch: every row that is generating, stepped together, rows joining and leaving
//! between steps. The synchronous core of both [`crate::Model::generate_batch_from`] (rows that
//! all join at the start) and the [`crate::Engine`] (rows that join when their prompt is in and
//! leave when they end or are cancelled).

use std::ops::ControlFlow;

use rayon::prelude::*;

use super::row::{Drawn, Row};
use super::tokenizer::Tokenizer;
use super::{StopReason, Token};
use crate::cache::Cache;
use crate::model::Model;
use crate::{Error, Result};

/// Rows decoding together in one stacked cache.
pub(crate) struct DecodeBatch {
    /// The rows' state, one row per entry of `rows`, in that order; `None` when empty.
    cache: Option<Cache>,
    rows: Vec<(u64, Row)>,
    /// Give each leaving row its cache (the decode loop returns them; the engine frees them).
    keep_caches: bool,
    finished: Vec<Retired>,
}

/// A row that has left the batch.
pub(crate) struct Retired {
    pub(crate) id: u64,
    pub(crate) row: Row,
    /// Text released at the end (held back until then).
    pub(crate) tail: String,
    /// Its state, when the batch keeps caches.
    pub(crate) cache: Option<Cache>,
    /// Why it failed, if it did.
    pub(crate) error: Option<Error>,
}

impl DecodeBatch {
    pub(crate) fn new(keep_caches: bool) -> Self {
        DecodeBatch {
            cache: None,
            rows: Vec::new(),
            keep_caches,
            finished: Vec::new(),
        }
    }

    /// Rows decoding.
    pub(crate) fn len(&self) -> usize {
        self.rows.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The ids of the rows, in batch order.
    pub(crate) fn ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.rows.iter().map(|(id, _)| *id)
    }

    /// Bytes of state the batch holds.
    pub(crate) fn cache_bytes(&self) -> usize {
        self.cache.as_ref().map_or(0, Cache::allocated_bytes)
    }

    /// Rows join: each with its one-sequence cache holding its prompt and the logits its first
    /// token is chosen from already given ([`Row::start`]). The caches are stacked onto the
    /// batch in one copy.
    pub(crate) fn admit(&mut self, joining: Vec<(u64, Row, Cache)>) -> Result<()> {
        if joining.is_empty() {
            return Ok(());
        }
        let mut parts: Vec<Cache> = self.cache.take().into_iter().collect();
        for (id, row, cache) in joining {
            parts.push(cache);
            self.rows.push((id, row));
        }
        self.cache = Some(match parts.len() {
            1 => parts.remove(0),
            _ => Cache::stack(&parts)?,
        });
        Ok(())
    }

    /// One step: every row chooses its next token (reported with `report(id, token)`; `Break`
    /// ends that row), rows that have ended leave, and the others are fed their tokens in one
    /// batched model step. Rows that left are collected for [`DecodeBatch::take_finished`]; an
    /// error here is the model step's, which leaves the remaining rows' state unknown.
    pub(crate) fn step(
        &mut self,
        model: &Model,
        tokenizer: Option<&Tokenizer>,
        mut report: impl FnMut(u64, &Token) -> ControlFlow<()>,
    ) -> Result<()> {
        let mut next = Vec::with_capacity(self.rows.len());
        let mut leaving = Vec::new();
        // Rows draw in parallel (each its own sampler and logits: the same tokens as one by
        // one; a vocabulary's softmax per row adds up over a batch), then report in order.
        let draws: Vec<Result<Option<Drawn>>> = if self.rows.len() > 1 {
            self.rows
                .par_iter_mut()
                .map(|(_, row)| row.draw())
                .collect()
        } else {
            self.rows.iter_mut().map(|(_, row)| row.draw()).collect()
        };
        for (slot, ((id, row), drawn)) in self.rows.iter_mut().zip(draws).enumerate() {
            let chosen = match drawn {
                Ok(Some(drawn)) => row.accept(drawn, tokenizer, |t| report(*id, t)),
                Ok(None) => Ok(None),
                Err(e) => Err(e),
            };
            match chosen {
                Ok(Some(tok)) => next.push(tok),
                Ok(None) => leaving.push((slot, None)),
                Err(e) => leaving.push((slot, Some(e))),
            }
        }
        self.retire(leaving, tokenizer)?;
        if let Some(cache) = self.cache.as_mut() {
            let logits = model.step_ids(&next, cache)?.to_vec2::<f32>()?;
            for ((_, row), l) in self.rows.iter_mut().zip(logits) {
                row.set_logits(l);
            }
        }
        Ok(())
    }

    /// Rows `ids` leave now with `reason` (a cancellation).
    pub(crate) fn remove(
        &mut self,
        ids: &[u64],
        reason: StopReason,
        tokenizer: Option<&Tokenizer>,
    ) -> Result<()> {
        let mut leaving = Vec::new();
        for (slot, (id, row)) in self.rows.iter_mut().enumerate() {
            if ids.contains(id) {
                row.out.stop_reason = reason;
                leaving.push((slot, None));
            }
        }
        self.retire(leaving, tokenizer)
    }

    /// Every row leaves with `error` (the batch's state is lost).
    pub(crate) fn fail_all(&mut self, error: &Error) {
        self.cache = None;
        for (id, row) in self.rows.drain(..) {
            self.finished.push(Retired {
                id,
                row,
                tail: String::new(),
                cache: None,
                error: Some(Error::Generation(format!(
                    "the decode batch failed: {error}"
                ))),
            });
        }
    }

    /// The rows that have left since the last call, in the order they left.
    pub(crate) fn take_finished(&mut self) -> Vec<Retired> {
        std::mem::take(&mut self.finished)
    }

    /// Moves the rows at `leaving` (ascending slots) out of the batch; their state is freed, or
    /// given to them when the batch keeps caches.
    fn retire(
        &mut self,
        leaving: Vec<(usize, Option<Error>)>,
        tokenizer: Option<&Tokenizer>,
    ) -> Result<()> {
        if leaving.is_empty() {
            return Ok(());
        }
        let Some(cache) = self.cache.take() else {
            return Err(Error::Input("a decode batch with rows but no cache".into()));
        };
        let stay: Vec<usize> = (0..self.rows.len())
            .filter(|s| !leaving.iter().any(|(l, _)| l == s))
            .collect();
        let mut own = Vec::with_capacity(leaving.len());
        for (slot, _) in &leaving {
            own.push(match self.keep_caches {
                true => Some(cache.select(&[*slot])?),
                false => None,
            });
        }
        self.cache = match stay.is_empty() {
            true => None,
            false => Some(cache.select(&stay)?),
        };
        drop(cache);
        let mut rows: Vec<Option<(u64, Row)>> = self.rows.drain(..).map(Some).collect();
        for ((slot, error), cache) in leaving.into_iter().zip(own) {
            let Some((id, mut row)) = rows.get_mut(slot).and_then(Option::take) else {
                continue;
            };
            let (tail, error) = match (row.finish(tokenizer), error) {
                (Ok(tail), error) => (tail, error),
                (Err(e), None) => (String::new(), Some(e)),
                (Err(_), Some(e)) => (String::new(), Some(e)),
            };
            self.finished.push(Retired {
                id,
                row,
                tail,
                cache,
                error,
            });
        }
        self.rows = rows.into_iter().flatten().collect();
        Ok(())
    }
}
