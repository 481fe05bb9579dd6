//! The YOCO model: immutable weights, and one chunk step that reads as the architecture:
//!
//! ```text
//! x0     = sqrt(dim) * embed_tokens[ids]
//! x      = self_decoder(x0)            n_layers/2 layers, constant-size state per layer
//! K, V   = global_kv(x)                once, at the midpoint: THE one KV cache of the model
//! x      = cross_decoder(x, K, V)      n_layers/2 layers, all reading the same K, V
//! logits = output_projection(layer_norm(x))
//! ```
//!
//! Every layer is pre-norm with residuals: `h = x + mixer(norm(x))`, `out = h + ffn(norm(h))`.

use candle_core::{DType, Module, Tensor};
use candle_nn::Embedding;

use crate::layers::constants::Constants;
use crate::layers::global_kv::GlobalKv;
use crate::layers::linear::Linear;
use crate::layers::norm::RmsNorm;
use crate::layers::rope::Rope;
use crate::layers::{Block, Weights};
use crate::models::yoco::catalogue::Catalogue;
use crate::models::yoco::config::Config;
use crate::models::yoco::cross_decoder::{CrossAttention, KvBuilder};
use crate::models::yoco::self_decoder::{SelfDecoder, SelfDecoderState};
use crate::models::Logits;
use crate::Result;

/// A YOCO model's weights.
#[derive(Clone, Debug)]
pub(crate) struct Yoco {
    pub(crate) cfg: Config,
    embed_tokens: Embedding,
    self_decoder: SelfDecoder,
    kv_builder: KvBuilder,
    cross_layers: Vec<Block<CrossAttention>>,
    layer_norm: RmsNorm,
    output_projection: Linear,
    self_rope: Rope,
    attn_rope: Rope,
}

impl Yoco {
    /// Builds every layer of `cfg` from `w`.
    pub(crate) fn build(cfg: Config, w: &Weights) -> Result<Self> {
        cfg.validate()?;
        let device = w.device().clone();
        let cat = Catalogue::new(&cfg);
        let embed_tokens = Embedding::new(w.get(&cat.embed_tokens)?, cfg.dim);
        let self_decoder = SelfDecoder::load(w, &cat, &cfg)?;
        let kv_builder = KvBuilder::load(w, &cat, &cfg)?;
        let heads = (cfg.n_attn_heads, cfg.attn_head_dim());
        let cross_layers = cat
            .cross_layers
            .iter()
            .map(|spec| Block::load(w, spec, cfg.norm_eps, |m| CrossAttention::load(w, m, heads)))
            .collect::<Result<Vec<_>>>()?;
        let layer_norm = RmsNorm::load(w, &cat.layer_norm, cfg.norm_eps)?;
        let output_projection = Linear::load(w, &cat.output_projection)?;
        Ok(Yoco {
            layer_norm,
            output_projection,
            self_rope: Rope::new(cfg.self_head_dim(), cfg.rope_theta, &device)?,
            attn_rope: Rope::new(cfg.attn_head_dim(), cfg.rope_theta, &device)?,
            cfg,
            embed_tokens,
            self_decoder,
            kv_builder,
            cross_layers,
        })
    }

    /// One chunk `ids: (B, C)` (checked) through the YOCO model.
    pub(crate) fn forward_chunk(
        &self,
        ids: &Tensor,
        self_state: &mut SelfDecoderState,
        global: &mut GlobalKv,
        consts: &Constants,
        wanted: Logits,
    ) -> Result<Option<Tensor>> {
        let (_, c) = ids.dims2()?;
        let starts = global.positions().to_vec();
        let dtype = self.embed_tokens.embeddings().dtype();

        // 1. Embed: a plain scale, no position embedding.
        let x = self.embed_tokens.forward(&ids.to_dtype(DType::U32)?)?;
        let x = (x * (self.cfg.dim as f64).sqrt())?;

        // 2. The self-decoder, each layer with its own constant-size state.
        let rope = self.self_rope.tables(&starts, c, dtype)?;
        let x = self.self_decoder.forward(&x, &rope, self_state, consts)?;

        // 3. The midpoint: this chunk's rows of the one global K/V.
        let rope = self.attn_rope.tables(&starts, c, dtype)?;
        global.append(self.kv_builder.forward(&x, &rope)?)?;

        // 4. Early exit: the cross-decoder runs only for the rows that need logits.
        let (mut x, rope, queries) = match wanted {
            Logits::None => return Ok(None),
            Logits::Last => (x.narrow(1, c - 1, 1)?, rope.last()?, 1),
            Logits::All => (x, rope, c),
        };
        let global = global.view(queries, c, consts)?;

        // 5. The cross-decoder: every layer reads the same global K/V.
        for layer in &self.cross_layers {
            x = layer.forward(&x, |m, xn| m.forward(xn, &rope, &global))?;
        }

        // 6. The head.
        let logits = self
            .output_projection
            .forward(&self.layer_norm.forward(&x)?)?
            .to_dtype(DType::F32)?;
        Ok(Some(match wanted {
            Logits::Last => logits.squeeze(1)?,
            _ => logits,
        }))
    }
}
