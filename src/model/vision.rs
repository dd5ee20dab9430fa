//! CLIP vision tower (Radford et al. 2021; transformers' `CLIPVisionModel`) as LLaVA uses it.
//!
//! LLaVA reads an intermediate hidden state, not the pooled output: HF's `hidden_states[i]`
//! counts the (pre-layernormed) embeddings as index 0, so `vision_feature_layer = -2` is the
//! output of the second-to-last encoder layer. Only the layers up to the deepest requested
//! index run; `post_layernorm` is never used and so never loaded.

use candle_core::{Module, Tensor, D};
use candle_nn::{Conv2d, Conv2dConfig, Embedding, LayerNorm, VarBuilder};

use super::dense::Dense;

use super::config::{resolve_hidden_state_index, Activation, FeatureSelect, LlavaConfig, VisionConfig};
use super::{ModelError, Result};

#[derive(Debug, Clone)]
struct Embeddings {
    patch_embedding: Conv2d,
    class_embedding: Tensor,
    position_embedding: Embedding,
    num_positions: usize,
}

impl Embeddings {
    fn load(vb: VarBuilder, cfg: &VisionConfig) -> Result<Self> {
        let conv = Conv2dConfig { stride: cfg.patch_size, ..Default::default() };
        let patch_embedding = candle_nn::conv2d_no_bias(
            cfg.num_channels,
            cfg.hidden_size,
            cfg.patch_size,
            conv,
            vb.pp("patch_embedding"),
        )?;
        let side = cfg.image_size / cfg.patch_size;
        let num_positions = side * side + 1;
        Ok(Self {
            patch_embedding,
            class_embedding: vb.get(cfg.hidden_size, "class_embedding")?,
            position_embedding: candle_nn::embedding(num_positions, cfg.hidden_size, vb.pp("position_embedding"))?,
            num_positions,
        })
    }

    /// (images, 3, H, W) -> (images, 1 + patches, hidden)
    fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let n = pixels.dim(0)?;
        let patches = self.patch_embedding.forward(pixels)?.flatten_from(2)?.transpose(1, 2)?;
        let hidden = self.class_embedding.dim(0)?;
        let cls = self.class_embedding.reshape((1, 1, hidden))?.broadcast_as((n, 1, hidden))?;
        let x = Tensor::cat(&[&cls.to_dtype(patches.dtype())?, &patches], 1)?;
        if x.dim(1)? != self.num_positions {
            return Err(ModelError::InvalidInput(format!(
                "vision tower expects {} positions, the image gives {}",
                self.num_positions,
                x.dim(1)?
            )));
        }
        Ok(x.broadcast_add(&self.position_embedding.embeddings().unsqueeze(0)?)?)
    }
}

#[derive(Debug, Clone)]
struct Attention {
    /// `q_proj`, `k_proj`, `v_proj` stacked, as in the decoder (`super::dense`).
    qkv_proj: Dense,
    out_proj: Dense,
    heads: usize,
    head_dim: usize,
}

impl Attention {
    fn load(vb: VarBuilder, cfg: &VisionConfig) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(Self {
            qkv_proj: Dense::stacked(&[
                candle_nn::linear(d, d, vb.pp("q_proj"))?,
                candle_nn::linear(d, d, vb.pp("k_proj"))?,
                candle_nn::linear(d, d, vb.pp("v_proj"))?,
            ])?,
            out_proj: Dense::new(&candle_nn::linear(d, d, vb.pp("out_proj"))?)?,
            heads: cfg.num_attention_heads,
            head_dim: d / cfg.num_attention_heads,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, s, d) = x.dims3()?;
        let qkv = self.qkv_proj.forward(x)?.reshape((b, s, 3 * self.heads, self.head_dim))?;
        let split = |i: usize| -> Result<Tensor> {
            Ok(qkv.narrow(2, i * self.heads, self.heads)?.transpose(1, 2)?.contiguous()?)
        };
        let (q, k, v) = (split(0)?, split(1)?, split(2)?);
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        // No mask and no probabilities wanted: a fused kernel where one is built in (CUDA).
        if let Some(out) = super::fused_attn::attend(&q, &k, &v, super::fused_attn::FusedMask::Full, scale)? {
            return self.out_proj.forward(&out);
        }
        if let Some((out, _)) = super::attn_cpu::attend(&q, &k, &v, None, scale, false)? {
            return self.out_proj.forward(&out);
        }
        // Scaled and normalised in f32, as in the decoder.
        let scores = (q.matmul(&k.t()?)?.to_dtype(candle_core::DType::F32)? * scale)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = probs.to_dtype(v.dtype())?.matmul(&v)?.transpose(1, 2)?.reshape((b, s, d))?;
        self.out_proj.forward(&out)
    }
}

/// One CLIP encoder layer (also run in stages by LLaVA-HR's fast branch).
#[derive(Debug, Clone)]
pub(super) struct EncoderLayer {
    self_attn: Attention,
    layer_norm1: LayerNorm,
    fc1: Dense,
    fc2: Dense,
    layer_norm2: LayerNorm,
    act: Activation,
}

impl EncoderLayer {
    pub(super) fn load(vb: VarBuilder, cfg: &VisionConfig) -> Result<Self> {
        let (d, m, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.layer_norm_eps);
        Ok(Self {
            self_attn: Attention::load(vb.pp("self_attn"), cfg)?,
            layer_norm1: candle_nn::layer_norm(d, eps, vb.pp("layer_norm1"))?,
            fc1: Dense::new(&candle_nn::linear(d, m, vb.pp("mlp.fc1"))?)?,
            fc2: Dense::new(&candle_nn::linear(m, d, vb.pp("mlp.fc2"))?)?,
            layer_norm2: candle_nn::layer_norm(d, eps, vb.pp("layer_norm2"))?,
            act: cfg.hidden_act,
        })
    }

    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = (x + self.self_attn.forward(&self.layer_norm1.forward(x)?)?)?;
        let h = self.fc2.forward(&self.act.forward(&self.fc1.forward(&self.layer_norm2.forward(&x)?)?)?)?;
        Ok((x + h)?)
    }
}

/// The CLIP vision tower, truncated to the layers LLaVA reads.
#[derive(Debug, Clone)]
pub struct VisionTower {
    embeddings: Embeddings,
    pre_layrnorm: LayerNorm,
    layers: Vec<EncoderLayer>,
    /// Hidden-state indices whose features are concatenated, resolved to non-negative.
    feature_states: Vec<usize>,
    select: FeatureSelect,
}

impl VisionTower {
    /// Loads from the `vision_tower.vision_model` prefix.
    pub fn load(vb: VarBuilder, cfg: &LlavaConfig) -> Result<Self> {
        let v = &cfg.vision_config;
        let feature_states = cfg
            .vision_feature_layer
            .indices()
            .into_iter()
            .map(|i| {
                resolve_hidden_state_index(i, v.num_hidden_layers).ok_or_else(|| ModelError::Config {
                    file: "config.json".into(),
                    field: "vision_feature_layer".into(),
                    message: format!("{i} is out of range"),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let needed = feature_states.iter().copied().max().unwrap_or(0);
        let layers = (0..needed)
            .map(|i| EncoderLayer::load(vb.pp(format!("encoder.layers.{i}")), v))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embeddings: Embeddings::load(vb.pp("embeddings"), v)?,
            pre_layrnorm: candle_nn::layer_norm(v.hidden_size, v.layer_norm_eps, vb.pp("pre_layrnorm"))?,
            layers,
            feature_states,
            select: cfg.vision_feature_select_strategy,
        })
    }

    /// Image features (images, tokens, hidden * feature layers) for pixels (images, 3, H, W).
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let mut x = self.pre_layrnorm.forward(&self.embeddings.forward(pixels)?)?;
        let mut picked: Vec<Option<Tensor>> = vec![None; self.feature_states.len()];
        let mut record = |state: usize, x: &Tensor| {
            for (slot, &want) in picked.iter_mut().zip(&self.feature_states) {
                if want == state {
                    *slot = Some(x.clone());
                }
            }
        };
        record(0, &x);
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x)?;
            record(i + 1, &x);
        }
        let feats: Vec<Tensor> = picked.into_iter().flatten().collect();
        let feats = Tensor::cat(&feats, D::Minus1)?;
        Ok(match self.select {
            FeatureSelect::Default => {
                let tokens = feats.dim(1)?;
                feats.narrow(1, 1, tokens - 1)?
            }
            FeatureSelect::Full => feats,
        })
    }
}
