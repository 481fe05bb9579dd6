//! Every parameter of a Phi-4-mini-flash checkpoint: the Hugging Face `state_dict()` names, shapes
//! and parts, the one place they are written. Linear weights are `(out, in)`; the mixer module
//! is called `attn` whatever it is (Mamba, GMU or attention).
//!
//! ```text
//! model.embed_tokens.weight                                   (V, D)
//! model.layers.{i}.{input,post_attention}_layernorm.{weight,bias}  (D,)
//! model.layers.{i}.mlp.fc1.weight                             (2F, D)   [gate | up]
//! model.layers.{i}.mlp.fc2.weight                             (D, F)
//! Mamba:     attn.in_proj.weight (2E, D)  attn.conv1d.{weight (E,1,K), bias (E,)}
//!            attn.x_proj.weight (R+2N, E)  attn.dt_proj.{weight (E,R), bias (E,)}
//!            attn.A_log (E, N)  attn.D (E,)  attn.out_proj.weight (D, E)
//! attention: attn.Wqkv.{weight, bias} ((H + 2 H_kv) hd, D), Q only in cross layers (H hd, D)
//!            attn.out_proj.{weight (D, D), bias (D,)}
//!            attn.inner_cross_attn.lambda_{q1,k1,q2,k2} (hd,)  attn.inner_cross_attn.subln.weight (2 hd,)
//! GMU:       attn.in_proj.weight (E, D)  attn.out_proj.weight (D, E)
//! model.final_layernorm.{weight,bias}                         (D,)
//! lm_head.weight                                              (V, D)    optional: tied
//! ```

use crate::checkpoint::catalogue::{Group, LinearSpec, Parameter, Part};
use crate::models::phi4flash::config::{LayerRole, Phi4FlashConfig};

/// A LayerNorm's weight and bias.
pub(crate) struct NormSpec {
    pub weight: Parameter,
    pub bias: Parameter,
}

/// A Mamba-1 mixer's parameters.
pub(crate) struct MambaSpec {
    pub in_proj: LinearSpec,
    pub conv_weight: Parameter,
    pub conv_bias: Parameter,
    pub x_proj: LinearSpec,
    pub dt_proj: LinearSpec,
    pub dt_bias: Parameter,
    pub a_log: Parameter,
    pub d: Parameter,
    pub out_proj: LinearSpec,
}

/// A differential attention's parameters.
pub(crate) struct AttentionSpec {
    pub wqkv: LinearSpec,
    pub wqkv_bias: Parameter,
    pub out_proj: LinearSpec,
    pub out_bias: Parameter,
    /// `lambda_q1, lambda_k1, lambda_q2, lambda_k2`.
    pub lambdas: [Parameter; 4],
    pub subln: Parameter,
}

/// A gated memory unit's parameters.
pub(crate) struct GmuSpec {
    pub in_proj: LinearSpec,
    pub out_proj: LinearSpec,
}

/// A layer's mixer.
pub(crate) enum MixerSpec {
    Mamba(MambaSpec),
    Attention(AttentionSpec),
    Gmu(GmuSpec),
}

/// One decoder layer: `h = x + mixer(LN1(x))`, `out = h + MLP(LN2(h))`.
pub(crate) struct LayerSpec {
    pub role: LayerRole,
    pub input_norm: NormSpec,
    pub mixer: MixerSpec,
    pub post_norm: NormSpec,
    /// `fc1`: `[gate | up]` in one weight.
    pub fc1: LinearSpec,
    pub fc2: LinearSpec,
}

/// How a checkpoint holds the head, which the model ties to its embedding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum HeadForm {
    /// Only `model.embed_tokens.weight`: the head is the embedding (the published checkpoint).
    Tied,
    /// Both tensors (`lm_head.weight` then equals the embedding).
    Stored,
    /// Only `lm_head.weight`, quantized: the embedding's rows are read from it (a `model.gguf`
    /// that yoco wrote from a tied checkpoint, holding the table once).
    InHead,
}

impl HeadForm {
    /// The form of a checkpoint with these tensors (none of either: `Tied`, whose check then
    /// names the missing embedding).
    pub(crate) fn of(has_embedding: bool, has_head: bool) -> Self {
        match (has_embedding, has_head) {
            (true, true) => HeadForm::Stored,
            (false, true) => HeadForm::InHead,
            _ => HeadForm::Tied,
        }
    }
}

/// The whole model's parameters, shaped like the model.
pub(crate) struct Catalogue {
    /// `model.embed_tokens.weight` (always named here; absent from an `InHead` checkpoint).
    pub embed_tokens: Parameter,
    pub head_form: HeadForm,
    pub layers: Vec<LayerSpec>,
    pub final_norm: NormSpec,
    /// `lm_head.weight` when the checkpoint stores it (it then equals the embedding).
    pub lm_head: Option<LinearSpec>,
}

impl Catalogue {
    /// The parameters `cfg` implies, the head held as `head_form` says.
    pub(crate) fn new(cfg: &Phi4FlashConfig, head_form: HeadForm) -> Self {
        let lm_head = head_form != HeadForm::Tied;
        let (d, f, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
        let (h, kv, hd) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim(),
        );
        let (e, n, r, k) = (
            cfg.d_inner(),
            cfg.mamba_d_state,
            cfg.dt_rank(),
            cfg.mamba_d_conv,
        );
        let param = |name: String, shape: Vec<usize>, part: Part| Parameter { name, shape, part };
        let half = cfg.num_hidden_layers / 2;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let role = cfg.role(i);
                let part = match i {
                    i if i <= half => Part::SelfDecoder,
                    i if i == half + 1 => Part::GlobalKv,
                    _ => Part::CrossDecoder,
                };
                let p = |name: &str, shape: Vec<usize>| {
                    param(format!("model.layers.{i}.{name}"), shape, part)
                };
                let norm = |name: &str| NormSpec {
                    weight: p(&format!("{name}.weight"), vec![d]),
                    bias: p(&format!("{name}.bias"), vec![d]),
                };
                let mixer = match role {
                    LayerRole::Mamba | LayerRole::MemoryMamba => MixerSpec::Mamba(MambaSpec {
                        in_proj: vec![p("attn.in_proj.weight", vec![2 * e, d])],
                        conv_weight: p("attn.conv1d.weight", vec![e, 1, k]),
                        conv_bias: p("attn.conv1d.bias", vec![e]),
                        x_proj: vec![p("attn.x_proj.weight", vec![r + 2 * n, e])],
                        dt_proj: vec![p("attn.dt_proj.weight", vec![e, r])],
                        dt_bias: p("attn.dt_proj.bias", vec![e]),
                        a_log: p("attn.A_log", vec![e, n]),
                        d: p("attn.D", vec![e]),
                        out_proj: vec![p("attn.out_proj.weight", vec![d, e])],
                    }),
                    LayerRole::Gmu => MixerSpec::Gmu(GmuSpec {
                        in_proj: vec![p("attn.in_proj.weight", vec![e, d])],
                        out_proj: vec![p("attn.out_proj.weight", vec![d, e])],
                    }),
                    LayerRole::WindowAttention
                    | LayerRole::GlobalAttention
                    | LayerRole::CrossAttention => {
                        let rows = if role == LayerRole::CrossAttention {
                            h * hd
                        } else {
                            (h + 2 * kv) * hd
                        };
                        let lambda =
                            |x: &str| p(&format!("attn.inner_cross_attn.lambda_{x}"), vec![hd]);
                        MixerSpec::Attention(AttentionSpec {
                            wqkv: vec![p("attn.Wqkv.weight", vec![rows, d])],
                            wqkv_bias: p("attn.Wqkv.bias", vec![rows]),
                            out_proj: vec![p("attn.out_proj.weight", vec![d, h * hd])],
                            out_bias: p("attn.out_proj.bias", vec![d]),
                            lambdas: [lambda("q1"), lambda("k1"), lambda("q2"), lambda("k2")],
                            subln: p("attn.inner_cross_attn.subln.weight", vec![2 * hd]),
                        })
                    }
                };
                LayerSpec {
                    role,
                    input_norm: norm("input_layernorm"),
                    mixer,
                    post_norm: norm("post_attention_layernorm"),
                    fc1: vec![p("mlp.fc1.weight", vec![2 * f, d])],
                    fc2: vec![p("mlp.fc2.weight", vec![d, f])],
                }
            })
            .collect();
        Catalogue {
            embed_tokens: param(
                "model.embed_tokens.weight".into(),
                vec![v, d],
                Part::Embedding,
            ),
            head_form,
            layers,
            final_norm: NormSpec {
                weight: param("model.final_layernorm.weight".into(), vec![d], Part::Head),
                bias: param("model.final_layernorm.bias".into(), vec![d], Part::Head),
            },
            lm_head: lm_head.then(|| vec![param("lm_head.weight".into(), vec![v, d], Part::Head)]),
        }
    }

    /// Every parameter, in the order the model loads them.
    pub(crate) fn parameters(&self) -> Vec<Parameter> {
        crate::checkpoint::catalogue::flatten(self.groups())
    }

    /// Every parameter in load order, each projection as one group (what quantization and the
    /// GGUF writer take).
    pub(crate) fn groups(&self) -> Vec<Group<'_>> {
        let mut out = Vec::new();
        if self.head_form != HeadForm::InHead {
            out.push(Group::Plain(&self.embed_tokens));
        }
        fn norm<'a>(out: &mut Vec<Group<'a>>, n: &'a NormSpec) {
            out.push(Group::Plain(&n.weight));
            out.push(Group::Plain(&n.bias));
        }
        for layer in &self.layers {
            norm(&mut out, &layer.input_norm);
            match &layer.mixer {
                MixerSpec::Mamba(m) => {
                    out.push(Group::Linear(&m.in_proj));
                    out.push(Group::Plain(&m.conv_weight));
                    out.push(Group::Plain(&m.conv_bias));
                    out.push(Group::Linear(&m.x_proj));
                    out.push(Group::Linear(&m.dt_proj));
                    out.push(Group::Plain(&m.dt_bias));
                    out.push(Group::Plain(&m.a_log));
                    out.push(Group::Plain(&m.d));
                    out.push(Group::Linear(&m.out_proj));
                }
                MixerSpec::Attention(a) => {
                    out.push(Group::Linear(&a.wqkv));
                    out.push(Group::Plain(&a.wqkv_bias));
                    out.push(Group::Linear(&a.out_proj));
                    out.push(Group::Plain(&a.out_bias));
                    out.extend(a.lambdas.iter().map(Group::Plain));
                    out.push(Group::Plain(&a.subln));
                }
                MixerSpec::Gmu(g) => {
                    out.push(Group::Linear(&g.in_proj));
                    out.push(Group::Linear(&g.out_proj));
                }
            }
            norm(&mut out, &layer.post_norm);
            out.push(Group::Linear(&layer.fc1));
            out.push(Group::Linear(&layer.fc2));
        }
        norm(&mut out, &self.final_norm);
        if let Some(head) = &self.lm_head {
            out.push(Group::Linear(head));
        }
        out
    }
}

impl Phi4FlashConfig {
    /// Every parameter of a checkpoint of this shape (with `lm_head.weight` stored or not): names,
    /// shapes and parts, in load order.
    pub fn parameters(&self, lm_head: bool) -> Vec<Parameter> {
        let form = if lm_head {
            HeadForm::Stored
        } else {
            HeadForm::Tied
        };
        Catalogue::new(self, form).parameters()
    }

    /// Number of parameters, the tied embedding counted once.
    pub fn n_params(&self) -> usize {
        self.parameters(false)
            .iter()
            .map(|p| p.shape.iter().product::<usize>())
            .sum()
    }
}
