//! Constant tensors (masks that depend only on a shape), built once per shape on the model's
//! device and reused by every layer and every chunk that needs them.
//!
//! Without this, retention rebuilt two `C x C` masks on the host and uploaded them for every
//! chunk of every layer, and the sliding window one `C x (W - 1 + C)` mask per chunk.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::Tensor;

use crate::Result;

/// What a constant is, and the shape it depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum ConstKey {
    /// `(C, C)` f32: 1 strictly below the diagonal, 0 elsewhere (retention's segment sums).
    StrictlyLower(usize),
    /// `(C, C)` f32: -inf strictly above the diagonal, 0 elsewhere (retention's decay mask).
    UpperNegInf(usize),
    /// `(C, retained + C)` f32 additive mask of a sliding window of `window` keys, for a block of
    /// `c` queries after `retained` earlier keys.
    Window {
        c: usize,
        retained: usize,
        window: usize,
    },
}

impl ConstKey {
    /// The causal `(C, C)` mask of a chunk over its own keys (a window that never binds).
    pub(crate) fn causal(c: usize) -> Self {
        ConstKey::Window {
            c,
            retained: 0,
            window: usize::MAX,
        }
    }
}

/// Bounds the memo: shapes come from chunk sizes, so a handful are in use at a time; a caller
/// that varies its chunk size endlessly only costs rebuilds, not memory.
const MAX_ENTRIES: usize = 64;

/// A shared memo of constant tensors on one device. Cloning shares the memo.
#[derive(Clone, Debug, Default)]
pub(crate) struct Constants {
    memo: Arc<Mutex<HashMap<ConstKey, Tensor>>>,
}

impl Constants {
    /// The tensor for `key`, built by `build` the first time it is asked for.
    pub(crate) fn get(
        &self,
        key: ConstKey,
        build: impl FnOnce() -> Result<Tensor>,
    ) -> Result<Tensor> {
        // A poisoned memo still holds valid tensors (they are inserted whole).
        let lock = || self.memo.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = lock().get(&key) {
            return Ok(t.clone());
        }
        // Built outside the lock: two threads may both build a new shape once, which is harmless.
        let t = build()?;
        let mut memo = lock();
        if memo.len() >= MAX_ENTRIES {
            memo.clear();
        }
        memo.insert(key, t.clone());
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn a_constant_is_built_once_per_key_and_shared_by_clones() -> Result<()> {
        let consts = Constants::default();
        let shared = consts.clone();
        let mut builds = 0;
        for _ in 0..3 {
            shared.get(ConstKey::StrictlyLower(4), || {
                builds += 1;
                Ok(Tensor::zeros(4, candle_core::DType::F32, &Device::Cpu)?)
            })?;
        }
        consts.get(ConstKey::StrictlyLower(5), || {
            builds += 1;
            Ok(Tensor::zeros(5, candle_core::DType::F32, &Device::Cpu)?)
        })?;
        assert_eq!(builds, 2);
        Ok(())
    }
}
