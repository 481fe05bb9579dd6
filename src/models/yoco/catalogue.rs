//! The YOCO weight catalogue: every parameter a config implies, with its official name, shape and
//! place in the architecture, and which projections yoco fuses.
//!
//! This is the one place where parameter names are written. Loading checks checkpoints against
//! it, [`crate::Model::new`] builds every layer from it, [`crate::Model::random`] draws it, and
//! the size methods of [`Config`] (`parameters`, `n_params`, `param_counts`) count it.
//!
//! The names are the official code's `state_dict()` names (microsoft/unilm `YOCO/`), linear
//! weights `(out, in)`:
//!
//! ```text
//! embed_tokens.weight                                   (V, D)
//! self_decoder.layers.{l}.mixer_layer_norm.weight       (D,)
//! self_decoder.layers.{l}.mixer.{q,k,v,g}_proj.weight   (D, D)     gated retention
//! self_decoder.layers.{l}.mixer.gt_proj.weight          (Hs, D)    gated retention
//! self_decoder.layers.{l}.mixer.{q,k,v}_proj.weight     (D, D)     sliding window
//! self_decoder.layers.{l}.mixer.out_proj.weight         (D, D)
//! {self,cross}_decoder.layers.{l}.final_layer_norm.weight (D,)
//! {self,cross}_decoder.layers.{l}.ffn.{fc1,gate}.weight (F, D)
//! {self,cross}_decoder.layers.{l}.ffn.fc2.weight        (D, F)
//! cross_decoder.kv_layer_norm.weight                    (D,)
//! cross_decoder.{k,v}_proj.weight                       (Hkv * hd, D)
//! cross_decoder.layers.{l}.mixer_layer_norm.weight      (D,)
//! cross_decoder.layers.{l}.mixer.{q,out}_proj.weight    (D, D)
//! layer_norm.weight                                     (D,)       the final norm: top level
//! output_projection.weight                              (V, D)
//! ```

use crate::checkpoint::catalogue::{BlockSpec, Group, LinearSpec, ParamCounts, Parameter, Part};
use crate::models::yoco::config::{Config, SelfMixer};

/// A self-decoder mixer's projections.
pub(crate) enum SelfMixerSpec {
    /// `q, k, v, g, gt` fused, then `out`.
    Retention {
        qkvg_gt: LinearSpec,
        out: LinearSpec,
    },
    /// `q, k, v` fused, then `out`.
    Window { qkv: LinearSpec, out: LinearSpec },
}

/// A cross-decoder mixer's projections (the keys and values are the global K/V).
pub(crate) struct CrossSpec {
    pub q: LinearSpec,
    pub out: LinearSpec,
}

/// The whole model's parameters, shaped like the model.
pub(crate) struct Catalogue {
    pub embed_tokens: Parameter,
    pub self_layers: Vec<BlockSpec<SelfMixerSpec>>,
    pub kv_layer_norm: Parameter,
    /// `k_proj` and `v_proj`, fused.
    pub kv: LinearSpec,
    pub cross_layers: Vec<BlockSpec<CrossSpec>>,
    pub layer_norm: Parameter,
    pub output_projection: LinearSpec,
}

impl Catalogue {
    pub(crate) fn new(cfg: &Config) -> Self {
        let (d, f, v) = (cfg.dim, cfg.hidden_dim, cfg.vocab_size);
        let param = |name: String, shape: Vec<usize>, part: Part| Parameter { name, shape, part };

        let self_layers = (0..cfg.n_half_layers())
            .map(|l| {
                let prefix = format!("self_decoder.layers.{l}");
                let m = format!("{prefix}.mixer.");
                let part = Part::SelfDecoder;
                let mixer = match cfg.self_mixer() {
                    SelfMixer::GatedRetention => SelfMixerSpec::Retention {
                        qkvg_gt: linear(
                            part,
                            &m,
                            &[
                                ("q_proj", d),
                                ("k_proj", d),
                                ("v_proj", d),
                                ("g_proj", d),
                                ("gt_proj", cfg.n_self_heads),
                            ],
                            d,
                        ),
                        out: linear(part, &m, &[("out_proj", d)], d),
                    },
                    SelfMixer::SlidingWindow { .. } => SelfMixerSpec::Window {
                        qkv: linear(part, &m, &[("q_proj", d), ("k_proj", d), ("v_proj", d)], d),
                        out: linear(part, &m, &[("out_proj", d)], d),
                    },
                };
                block(part, &prefix, mixer, (d, f))
            })
            .collect();
        let cross_layers = (0..cfg.n_half_layers())
            .map(|l| {
                let prefix = format!("cross_decoder.layers.{l}");
                let m = format!("{prefix}.mixer.");
                let part = Part::CrossDecoder;
                let mixer = CrossSpec {
                    q: linear(part, &m, &[("q_proj", d)], d),
                    out: linear(part, &m, &[("out_proj", d)], d),
                };
                block(part, &prefix, mixer, (d, f))
            })
            .collect();
        let kv_dim = cfg.kv_dim();
        Catalogue {
            embed_tokens: param("embed_tokens.weight".into(), vec![v, d], Part::Embedding),
            self_layers,
            kv_layer_norm: param(
                "cross_decoder.kv_layer_norm.weight".into(),
                vec![d],
                Part::GlobalKv,
            ),
            kv: linear(
                Part::GlobalKv,
                "cross_decoder.",
                &[("k_proj", kv_dim), ("v_proj", kv_dim)],
                d,
            ),
            cross_layers,
            // The model's own final norm (`YOCO.layer_norm`), not the cross-decoder's.
            layer_norm: param("layer_norm.weight".into(), vec![d], Part::Head),
            output_projection: linear(Part::Head, "", &[("output_projection", v)], d),
        }
    }

    /// Every parameter, flat, in the order of the model.
    pub(crate) fn parameters(&self) -> Vec<Parameter> {
        crate::checkpoint::catalogue::flatten(self.groups())
    }

    /// Every parameter in the order of the model, the fused projections as one group each.
    pub(crate) fn groups(&self) -> Vec<Group<'_>> {
        fn block<'a, M>(out: &mut Vec<Group<'a>>, b: &'a BlockSpec<M>, mixer: &[&'a LinearSpec]) {
            out.push(Group::Plain(&b.mixer_layer_norm));
            out.extend(mixer.iter().map(|spec| Group::Linear(spec)));
            out.push(Group::Plain(&b.final_layer_norm));
            out.push(Group::Linear(&b.fc1_gate));
            out.push(Group::Linear(&b.fc2));
        }
        let mut out = vec![Group::Plain(&self.embed_tokens)];
        for b in &self.self_layers {
            match &b.mixer {
                SelfMixerSpec::Retention { qkvg_gt, out: o } => block(&mut out, b, &[qkvg_gt, o]),
                SelfMixerSpec::Window { qkv, out: o } => block(&mut out, b, &[qkv, o]),
            }
        }
        out.push(Group::Plain(&self.kv_layer_norm));
        out.push(Group::Linear(&self.kv));
        for b in &self.cross_layers {
            block(&mut out, b, &[&b.mixer.q, &b.mixer.out]);
        }
        out.push(Group::Plain(&self.layer_norm));
        out.push(Group::Linear(&self.output_projection));
        out
    }
}

/// Projections `{prefix}{name}.weight` of output widths `outs`, all reading `in_dim`.
fn linear(part: Part, prefix: &str, outs: &[(&str, usize)], in_dim: usize) -> LinearSpec {
    outs.iter()
        .map(|&(name, out)| Parameter {
            name: format!("{prefix}{name}.weight"),
            shape: vec![out, in_dim],
            part,
        })
        .collect()
}

/// The block `{prefix}.*` around `mixer`, for width `d` and FFN width `f`.
fn block<M>(part: Part, prefix: &str, mixer: M, (d, f): (usize, usize)) -> BlockSpec<M> {
    let norm = |name: &str| Parameter {
        name: format!("{prefix}.{name}.weight"),
        shape: vec![d],
        part,
    };
    let ffn = format!("{prefix}.ffn.");
    BlockSpec {
        mixer_layer_norm: norm("mixer_layer_norm"),
        mixer,
        final_layer_norm: norm("final_layer_norm"),
        fc1_gate: linear(part, &ffn, &[("fc1", f), ("gate", f)], d),
        fc2: linear(part, &ffn, &[("fc2", d)], f),
    }
}

/// Sizes computed from the catalogue (here rather than in `config.rs`, which the catalogue
/// reads: the config does not depend on the names).
impl Config {
    /// Every parameter this config implies: official name, shape and part of the model. This is
    /// what a checkpoint must hold (nothing more, nothing less) and what [`crate::Model::new`]
    /// asks its `VarBuilder` for.
    pub fn parameters(&self) -> Vec<Parameter> {
        Catalogue::new(self).parameters()
    }

    /// Number of parameters the config implies.
    pub fn n_params(&self) -> usize {
        self.param_counts().total()
    }

    /// Parameters per part of the architecture: what a prefill with early exit multiplies
    /// (self-decoder and global K/V) and what a decode step reads (all but the embedding).
    pub fn param_counts(&self) -> ParamCounts {
        let mut counts = ParamCounts::default();
        for p in self.parameters() {
            let n: usize = p.shape.iter().product();
            *match p.part {
                Part::Embedding => &mut counts.embedding,
                Part::SelfDecoder => &mut counts.self_decoder,
                Part::GlobalKv => &mut counts.global_kv,
                Part::CrossDecoder => &mut counts.cross_decoder,
                Part::Head => &mut counts.head,
            } += n;
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_counts_add_up() {
        for window in [None, Some(16)] {
            let mut cfg = Config::new(64, 4, 160, 4, 4, 2, 256);
            cfg.sliding_window = window;
            let params = cfg.parameters();
            let mut names: Vec<&str> = params.iter().map(|p| p.name.as_str()).collect();
            names.sort_unstable();
            names.dedup();
            assert_eq!(names.len(), params.len());
            // By hand: embedding + head (norm, projection), per half-layer two norms and the
            // FFN, the mixers, the global K/V.
            let (d, f, v) = (64, 160, 256);
            let ffn_and_norms = 2 * d + 3 * d * f;
            let self_mixer = match window {
                None => 5 * d * d + 4 * d,
                Some(_) => 4 * d * d,
            };
            let want = 2 * v * d
                + d
                + 2 * (ffn_and_norms + self_mixer)
                + 2 * (ffn_and_norms + 2 * d * d)
                + d
                + 2 * 32 * d;
            assert_eq!(cfg.n_params(), want);
            let counts = cfg.param_counts();
            assert_eq!(counts.embedding, v * d);
            assert_eq!(counts.head, v * d + d);
            assert_eq!(counts.global_kv, d + 2 * 32 * d);
        }
    }

    #[test]
    fn the_final_norm_is_the_models_own() {
        let cfg = Config::new(8, 2, 16, 2, 2, 1, 16);
        let norm = cfg
            .parameters()
            .into_iter()
            .find(|p| p.name == "layer_norm.weight");
        assert_eq!(norm.map(|p| (p.shape, p.part)), Some((vec![8], Part::Head)));
    }
}
