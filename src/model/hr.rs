//! LLaVA-HR's dual-branch encoder (Luo et al. 2024, "Feast Your Eyes: Mixture-of-Resolution
//! Adaptation for Multimodal LLMs"; luogen1996/LLaVA-HR `MultiPathCLIPVisionTower`).
//!
//! Slow branch: ConvNeXt on the full S-pixel image, its stage-4 map (S/32 per side). Fast
//! branch: CLIP on the image resized (bilinear, align_corners) to F = max(int(S/32*patch),
//! CLIP's input size), position embeddings resized to the new grid (bicubic, antialias), CLS
//! dropped before `pre_layrnorm`, the encoder layers in four equal groups with an MR adapter
//! (`align_stages_latent.{0,1,2}`) after each of the first three, the last layer's output.
//! Fusion (`align_stages.0`): fast_proj(fast) + slow_proj(slow), the slow map brought to the
//! fast grid (upsampled or pooled). Output: (B, (F/patch)^2, CLIP hidden).

use candle_core::{Module, Tensor, D};
use candle_nn::{Conv2d, Conv2dConfig, LayerNorm, Linear, VarBuilder};

use super::config::VisionConfig;
use super::convnext::{ConvNext, DepthwiseConv};
use super::hr_config::HrSpec;
use super::interp;
use super::vision::EncoderLayer;
use super::{ModelError, Result};

/// A 1x1 convolution stored as `(out, in, 1, 1)`, applied to channels-last tokens as a Linear.
fn pointwise(cin: usize, cout: usize, vb: VarBuilder) -> Result<Linear> {
    let w = vb.get((cout, cin, 1, 1), "weight")?.reshape((cout, cin))?;
    Ok(Linear::new(w, Some(vb.get(cout, "bias")?)))
}

/// (B, C, H, W) -> (B, H * W, C), the reference's `view(b, c, -1).transpose(1, 2)`.
fn tokens(map: &Tensor) -> Result<Tensor> {
    Ok(map.flatten_from(2)?.transpose(1, 2)?)
}

/// (B, L, C) on a square grid -> (B, C, side, side).
fn grid(t: &Tensor) -> Result<Tensor> {
    let (b, l, c) = t.dims3()?;
    let side = (l as f64).sqrt() as usize;
    Ok(t.transpose(1, 2)?.reshape((b, c, side, side))?)
}

/// Brings slow tokens (B, l, C) to `len` tokens: bilinear (align_corners) upsampling when fewer,
/// average pooling when more (the reference's `src2dst_align`).
fn align(src: &Tensor, len: usize) -> Result<Tensor> {
    let l = src.dim(1)?;
    if l == len {
        return Ok(src.clone());
    }
    let dst = (len as f64).sqrt() as usize;
    let map = grid(src)?;
    let map = if l < len {
        interp::bilinear_align_corners(&map, (dst, dst))?
    } else {
        let k = map.dim(2)? / dst;
        map.avg_pool2d(k)?
    };
    tokens(&map)
}

/// `S2FStitchAlignModuleV2`: slow features projected to the fast width and gated into the fast
/// tokens, which first pass a depthwise 7x7 residual.
#[derive(Debug, Clone)]
struct Adapter {
    slow_conv: Linear,
    slow_proj: Linear,
    fast_conv: DepthwiseConv,
    fast_proj: Linear,
    gate_in: Linear,
    gate_out: Linear,
}

impl Adapter {
    fn load(fast: usize, slow: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            slow_conv: pointwise(slow, slow, vb.pp("slow_conv"))?,
            slow_proj: pointwise(slow, fast, vb.pp("slow_proj"))?,
            fast_conv: DepthwiseConv::load(fast, 7, vb.pp("fast_conv"))?,
            fast_proj: pointwise(fast, fast, vb.pp("fast_proj"))?,
            gate_in: candle_nn::linear(2 * fast, fast / 2, vb.pp("gate.0"))?,
            gate_out: candle_nn::linear(fast / 2, 1, vb.pp("gate.2"))?,
        })
    }

    /// fast (B, L, Cf), slow (B, Cs, h, w) -> (B, L, Cf).
    fn forward(&self, fast: &Tensor, slow: &Tensor) -> Result<Tensor> {
        let s = self.slow_proj.forward(&self.slow_conv.forward(&tokens(slow)?)?.gelu_erf()?)?;
        let s = align(&s, fast.dim(1)?)?;
        let map = grid(fast)?;
        let local = self.fast_proj.forward(&tokens(&self.fast_conv.forward(&map)?)?.gelu_erf()?)?;
        let f = (fast + local)?;
        let pooled = Tensor::cat(&[&f, &s], D::Minus1)?.mean_keepdim(1)?;
        let gate = self.gate_out.forward(&self.gate_in.forward(&pooled)?.gelu_erf()?)?.tanh()?;
        Ok((f + s.broadcast_mul(&gate)?)?)
    }
}

/// The multi-path tower: CLIP (fast) and ConvNeXt (slow) with adapters and the final merge.
#[derive(Debug, Clone)]
pub(super) struct HrTower {
    patch_embedding: Conv2d,
    /// Position embeddings of the patches on the fast grid, (1, tokens, Cf): resized once at
    /// load; the CLS position is dropped with the CLS token.
    positions: Tensor,
    pre_layrnorm: LayerNorm,
    layers: Vec<EncoderLayer>,
    adapters: Vec<Adapter>,
    fast_proj: Linear,
    slow_proj: Linear,
    slow: ConvNext,
    spec: HrSpec,
    patch: usize,
}

impl HrTower {
    /// Loads from `model.vision_tower`.
    pub(super) fn load(vb: VarBuilder, v: &VisionConfig, spec: &HrSpec) -> Result<Self> {
        let clip = vb.pp("fast_vision_tower.vision_tower.vision_model");
        let (d, p) = (v.hidden_size, v.patch_size);
        if v.num_hidden_layers == 0 || !v.num_hidden_layers.is_multiple_of(4) {
            return Err(ModelError::Config {
                file: "config.json (CLIP)".into(),
                field: "num_hidden_layers".into(),
                message: format!("{} layers do not split into LLaVA-HR's four stages", v.num_hidden_layers),
            });
        }
        let emb = clip.pp("embeddings");
        let conv = Conv2dConfig { stride: p, ..Default::default() };
        let patch_embedding = candle_nn::conv2d_no_bias(v.num_channels, d, p, conv, emb.pp("patch_embedding"))?;
        // The reference prepends CLS, adds positions, then drops CLS before any layer: the class
        // embedding cannot affect the output, but it is part of the checkpoint's CLIP.
        emb.get(d, "class_embedding")?;
        let side = v.image_size / p;
        let table = emb.pp("position_embedding").get((side * side + 1, d), "weight")?;
        let fast_side = spec.fast_size / p;
        let patches = table.narrow(0, 1, side * side)?.t()?.reshape((1, d, side, side))?;
        let patches =
            if fast_side == side { patches } else { interp::bicubic_antialias(&patches, (fast_side, fast_side))? };
        let positions = tokens(&patches)?.contiguous()?;
        let layers = (0..v.num_hidden_layers)
            .map(|i| EncoderLayer::load(clip.pp(format!("encoder.layers.{i}")), v))
            .collect::<Result<Vec<_>>>()?;
        let slow = ConvNext::load(vb.pp("slow_vision_tower.vision_tower"))?;
        let cs = slow.width();
        let adapters = if spec.adapters {
            (0..3).map(|i| Adapter::load(d, cs, vb.pp(format!("align_stages_latent.{i}")))).collect::<Result<_>>()?
        } else {
            Vec::new()
        };
        let merge = vb.pp("align_stages.0");
        Ok(Self {
            patch_embedding,
            positions,
            pre_layrnorm: candle_nn::layer_norm(d, v.layer_norm_eps, clip.pp("pre_layrnorm"))?,
            layers,
            adapters,
            fast_proj: candle_nn::linear(d, d, merge.pp("fast_proj"))?,
            slow_proj: candle_nn::linear(cs, d, merge.pp("slow_proj"))?,
            slow,
            spec: spec.clone(),
            patch: p,
        })
    }

    /// Visual tokens per image.
    pub(super) fn token_count(&self) -> usize {
        self.spec.tokens(self.patch)
    }

    /// (B, 3, S, S) preprocessed pixels -> (B, tokens, CLIP hidden).
    pub(super) fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = pixels.dims4()?;
        let s = self.spec.image_size;
        if (h, w) != (s, s) {
            return Err(ModelError::InvalidInput(format!("LLaVA-HR expects {s}x{s} pixels, got {w}x{h}")));
        }
        let f = self.spec.fast_size;
        let fast_in = interp::bilinear_align_corners(pixels, (f, f))?;
        let mut y = tokens(&self.patch_embedding.forward(&fast_in)?)?;
        y = self.pre_layrnorm.forward(&y.broadcast_add(&self.positions.to_dtype(y.dtype())?)?)?;
        let slow = self.slow.forward(pixels)?;
        let group = self.layers.len() / 4;
        for (g, layers) in self.layers.chunks(group).enumerate() {
            for layer in layers {
                y = layer.forward(&y)?;
            }
            if let Some(adapter) = self.adapters.get(g).filter(|_| g < 3) {
                y = adapter.forward(&y, &slow)?;
            }
        }
        let s = align(&tokens(&slow)?, y.dim(1)?)?;
        Ok((self.fast_proj.forward(&y)? + self.slow_proj.forward(&s)?)?)
    }
}
