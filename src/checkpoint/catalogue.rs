//! What a weight catalogue is made of: every parameter a model's config implies, with its name
//! in the checkpoint, its shape and its place in the architecture ([`Parameter`], [`Part`]), and
//! which projections a model fuses ([`LinearSpec`]). Each family writes its own catalogue
//! (`models/*/catalogue.rs`); loading checks a checkpoint against one, strictly, before any
//! weight is read.

/// The part of the architecture a parameter belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Part {
    /// `embed_tokens`: read one row per token, never multiplied in full.
    Embedding,
    /// The self-decoder's layers (mixers, norms, feed-forward networks).
    SelfDecoder,
    /// The midpoint projection into the global K/V (`kv_layer_norm`, `k_proj`, `v_proj`).
    GlobalKv,
    /// The cross-decoder's layers.
    CrossDecoder,
    /// The final norm and the output projection.
    Head,
}

/// One parameter of a YOCO checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parameter {
    /// Official state-dict name, e.g. `self_decoder.layers.0.mixer.q_proj.weight`.
    pub name: String,
    /// Shape; linear weights are `(out, in)`.
    pub shape: Vec<usize>,
    /// Where it belongs.
    pub part: Part,
}

/// Parameter counts per part of the architecture (see [`crate::Config::param_counts`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ParamCounts {
    /// The embedding table.
    pub embedding: usize,
    /// All self-decoder layers.
    pub self_decoder: usize,
    /// The global K/V projection.
    pub global_kv: usize,
    /// All cross-decoder layers.
    pub cross_decoder: usize,
    /// Final norm and output projection.
    pub head: usize,
}

impl ParamCounts {
    /// Every parameter.
    pub fn total(&self) -> usize {
        self.embedding + self.self_decoder + self.global_kv + self.cross_decoder + self.head
    }
}

/// Projections over one input, fused into one weight in this order.
pub(crate) type LinearSpec = Vec<Parameter>;

/// A pre-norm residual block's parameters (both halves of the model).
pub(crate) struct BlockSpec<M> {
    pub mixer_layer_norm: Parameter,
    pub mixer: M,
    pub final_layer_norm: Parameter,
    /// `fc1` (activated) and `gate` (linear), fused.
    pub fc1_gate: LinearSpec,
    pub fc2: LinearSpec,
}

/// A parameter read alone, or a projection's fused pieces (what a catalogue's `groups` lists: the unit quantization and GGUF writing work in).
pub(crate) enum Group<'a> {
    /// The embedding or a norm: always float.
    Plain(&'a Parameter),
    /// A projection, possibly fused: what quantization applies to.
    Linear(&'a LinearSpec),
}

/// Every parameter of `groups`, flat, in order.
pub(crate) fn flatten(groups: Vec<Group<'_>>) -> Vec<Parameter> {
    let mut out = Vec::new();
    for group in groups {
        match group {
            Group::Plain(p) => out.push(p.clone()),
            Group::Linear(spec) => out.extend(spec.iter().cloned()),
        }
    }
    out
}
