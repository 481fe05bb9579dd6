//! The model families yoco runs. Each family's folder holds its config, its weight catalogue,
//! its mixers and its model; what they share (projections, norms, attention, K/V buffers) is in
//! `layers`, and [`crate::Model`] / [`crate::Cache`] are the one face every family shows.

pub(crate) mod phi4flash;
pub(crate) mod yoco;

/// Which positions of a chunk need logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Logits {
    /// None: the chunk only fills the caches (early exit: the cross-decoder never runs).
    None,
    /// The last position only (the end of a prompt, or a decode step).
    Last,
    /// Every position (scoring).
    All,
}
