//! Prefix reuse: the state after a prompt's first tokens, kept so that a later prompt that
//! starts with the same tokens (a system prompt, the earlier turns of a conversation) starts
//! from it instead of prefilling them again.
//!
//! In YOCO this is a plain copy-on-write clone of a [`Cache`]: the self-decoder's state at a
//! position is a fixed-size summary of everything before it (retention's `S`, or the window's
//! last `W - 1` keys), and the global K/V is append-only. Nothing has to be recomputed or
//! re-aligned, for gated retention and sliding window alike.

use crate::cache::Cache;
use crate::Result;

/// Stored prefix states, least recently used evicted first, within a byte budget.
pub(crate) struct PrefixCache {
    limit: usize,
    used: usize,
    entries: Vec<Entry>,
    clock: u64,
}

struct Entry {
    tokens: Vec<u32>,
    /// The state after `tokens`, holding nothing but them (no slack).
    cache: Cache,
    /// The logits after the last of `tokens`, when the prefix was a whole prompt: a prompt
    /// equal to it then needs no prefill at all.
    logits: Option<Vec<f32>>,
    bytes: usize,
    last_used: u64,
}

/// A prefix found for a prompt.
pub(crate) struct Hit {
    /// Tokens of the prompt it covers.
    pub(crate) len: usize,
    /// A copy-on-write clone of its state.
    pub(crate) cache: Cache,
    /// The next token's logits, when it covers the whole prompt.
    pub(crate) logits: Option<Vec<f32>>,
}

impl PrefixCache {
    /// A store of at most `limit` bytes (0 keeps nothing).
    pub(crate) fn new(limit: usize) -> Self {
        PrefixCache {
            limit,
            used: 0,
            entries: Vec::new(),
            clock: 0,
        }
    }

    /// Bytes held.
    pub(crate) fn bytes(&self) -> usize {
        self.used
    }

    /// Prefixes held.
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// The longest stored prefix of `prompt` that can start it: shorter than the prompt, or
    /// the whole prompt when its logits were kept.
    pub(crate) fn lookup(&mut self, prompt: &[u32]) -> Option<Hit> {
        self.clock += 1;
        let clock = self.clock;
        let best = self
            .entries
            .iter_mut()
            .filter(|e| {
                prompt.starts_with(&e.tokens)
                    && (e.tokens.len() < prompt.len() || e.logits.is_some())
            })
            .max_by_key(|e| e.tokens.len())?;
        best.last_used = clock;
        Some(Hit {
            len: best.tokens.len(),
            cache: best.cache.clone(),
            logits: match best.tokens.len() == prompt.len() {
                true => best.logits.clone(),
                false => None,
            },
        })
    }

    /// Keeps the state `cache` (one sequence) after `tokens`, with the next token's logits if
    /// known. The state is compacted into a copy of its own; least recently used prefixes are
    /// evicted until it fits, and one larger than the whole budget is not kept.
    pub(crate) fn insert(
        &mut self,
        tokens: &[u32],
        cache: &Cache,
        logits: Option<&[f32]>,
    ) -> Result<()> {
        if self.limit == 0 || tokens.is_empty() {
            return Ok(());
        }
        if let Some(e) = self.entries.iter_mut().find(|e| e.tokens == tokens) {
            if e.logits.is_none() {
                if let Some(l) = logits {
                    e.logits = Some(l.to_vec());
                    e.bytes += l.len() * 4;
                    self.used += l.len() * 4;
                }
            }
            self.clock += 1;
            e.last_used = self.clock;
            return self.evict(0);
        }
        // Cheap to estimate before copying: the entries in use plus the logits.
        let estimate = cache.size_bytes() + logits.map_or(0, |l| l.len() * 4) + tokens.len() * 4;
        if estimate > self.limit {
            return Ok(());
        }
        let mut own = cache.clone();
        own.shrink_to_fit()?;
        let bytes = own.allocated_bytes() + logits.map_or(0, |l| l.len() * 4) + tokens.len() * 4;
        self.evict(bytes)?;
        self.clock += 1;
        self.used += bytes;
        self.entries.push(Entry {
            tokens: tokens.to_vec(),
            cache: own,
            logits: logits.map(<[f32]>::to_vec),
            bytes,
            last_used: self.clock,
        });
        Ok(())
    }

    /// Evicts least recently used entries until `incoming` more bytes fit.
    fn evict(&mut self, incoming: usize) -> Result<()> {
        while self.used + incoming > self.limit {
            let Some(oldest) = self
                .entries
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.last_used)
                .map(|(i, _)| i)
            else {
                break;
            };
            let gone = self.entries.swap_remove(oldest);
            self.used = self.used.saturating_sub(gone.bytes);
        }
        Ok(())
    }
}
