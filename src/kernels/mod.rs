//! Hand-written CPU kernels over raw slices. They know no model: each takes tensors or slices
//! of documented shapes and returns `None` where its case does not apply (another device, another
//! dtype), so the caller falls back to candle's portable ops.

pub(crate) mod scan;
