//! ConvNeXt (Liu et al. 2022, "A ConvNet for the 2020s"; timm's `ConvNeXt` as LLaVA-HR's slow
//! branch builds it, e.g. `convnext_large_mlp.clip_laion2b_ft_320`): patch stem, four stages of
//! depthwise-7x7 blocks with layer scale, stride-2 downsampling between stages. Only the stem
//! and stages run (LLaVA-HR reads the stage-4 map); the classifier head is never loaded.
//!
//! Depths and widths are read off the checkpoint (`stages.N.blocks.M`, `conv_dw` shapes), so the
//! large, xxlarge and tiny test variants load alike.

use candle_core::{Module, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, LayerNorm, Linear, VarBuilder};

use super::{ModelError, Result};

/// timm's ConvNeXt norms (`LayerNorm2d` and the channels-last `LayerNorm`) use eps 1e-6.
const EPS: f64 = 1e-6;

/// A LayerNorm over the channels of an NCHW map (timm's `LayerNorm2d`).
#[derive(Debug, Clone)]
struct LayerNorm2d(LayerNorm);

impl LayerNorm2d {
    fn load(c: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self(candle_nn::layer_norm(c, EPS, vb)?))
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.0.forward(&x.permute((0, 2, 3, 1))?)?.permute((0, 3, 1, 2))?)
    }
}

/// A depthwise k x k convolution with bias and "same" padding: (B, C, H, W) -> (B, C, H, W).
#[derive(Debug, Clone)]
pub(super) struct DepthwiseConv {
    /// (C, k * k): one k x k filter per channel.
    weight: Tensor,
    /// (1, C, 1, 1).
    bias: Tensor,
    k: usize,
}

impl DepthwiseConv {
    /// Loads a `(C, 1, k, k)` weight and `(C,)` bias.
    pub(super) fn load(c: usize, k: usize, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get((c, 1, k, k), "weight")?.reshape((c, k * k))?;
        let bias = vb.get(c, "bias")?.reshape((1, c, 1, 1))?;
        Ok(Self { weight, bias, k })
    }

    /// Sums k * k shifted copies of the zero-padded input, each scaled per channel; a grouped
    /// conv2d would run C separate convolutions.
    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, c, h, w) = x.dims4()?;
        let p = self.k / 2;
        let padded = x.pad_with_zeros(2, p, p)?.pad_with_zeros(3, p, p)?;
        let mut acc: Option<Tensor> = None;
        for dy in 0..self.k {
            let rows = padded.narrow(2, dy, h)?;
            for dx in 0..self.k {
                let tap = self.weight.narrow(1, dy * self.k + dx, 1)?.reshape((1, c, 1, 1))?;
                let term = rows.narrow(3, dx, w)?.broadcast_mul(&tap)?;
                acc = Some(match acc {
                    Some(a) => (a + term)?,
                    None => term,
                });
            }
        }
        let acc = acc.ok_or_else(|| ModelError::Weights("depthwise conv with an empty kernel".into()))?;
        Ok(acc.broadcast_add(&self.bias)?)
    }
}

/// `ConvNeXtBlock` (conv_mlp = False): dwconv, channels-last LayerNorm, Linear-GELU-Linear,
/// layer scale `weight`, residual.
#[derive(Debug, Clone)]
struct Block {
    conv_dw: DepthwiseConv,
    norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    /// Layer scale (C,): timm names it `weight` on the block itself.
    gamma: Tensor,
}

impl Block {
    fn load(c: usize, k: usize, vb: VarBuilder) -> Result<Self> {
        let hidden = vb.pp("mlp.fc1").get_unchecked("weight")?.dim(0)?;
        Ok(Self {
            conv_dw: DepthwiseConv::load(c, k, vb.pp("conv_dw"))?,
            norm: candle_nn::layer_norm(c, EPS, vb.pp("norm"))?,
            fc1: candle_nn::linear(c, hidden, vb.pp("mlp.fc1"))?,
            fc2: candle_nn::linear(hidden, c, vb.pp("mlp.fc2"))?,
            gamma: vb.get(c, "weight")?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.conv_dw.forward(x)?.permute((0, 2, 3, 1))?;
        let h = self.fc2.forward(&self.fc1.forward(&self.norm.forward(&h)?)?.gelu_erf()?)?;
        let h = h.broadcast_mul(&self.gamma)?.permute((0, 3, 1, 2))?;
        Ok((h + x)?)
    }
}

#[derive(Debug, Clone)]
struct Stage {
    /// LayerNorm2d then a 2x2 stride-2 conv (absent in stage 0, whose stride is the stem's).
    downsample: Option<(LayerNorm2d, Conv2d)>,
    blocks: Vec<Block>,
}

/// ConvNeXt stem and stages.
#[derive(Debug, Clone)]
pub struct ConvNext {
    stem_conv: Conv2d,
    stem_norm: LayerNorm2d,
    stages: Vec<Stage>,
    width: usize,
}

impl ConvNext {
    /// Loads from the `...slow_vision_tower.vision_tower` prefix, reading the architecture off
    /// the tensors present.
    pub fn load(vb: VarBuilder) -> Result<Self> {
        let stem_w = vb.pp("stem.0").get_unchecked("weight")?;
        let (c0, cin, patch, _) = stem_w.dims4()?;
        let conv = Conv2dConfig { stride: patch, ..Default::default() };
        let stem_conv = candle_nn::conv2d(cin, c0, patch, conv, vb.pp("stem.0"))?;
        let stem_norm = LayerNorm2d::load(c0, vb.pp("stem.1"))?;
        let mut stages = Vec::with_capacity(4);
        let mut prev = c0;
        for i in 0..4 {
            let svb = vb.pp(format!("stages.{i}"));
            let first = svb.pp("blocks.0.conv_dw");
            if !first.contains_tensor("weight") {
                return Err(ModelError::Weights(format!("ConvNeXt stage {i} has no blocks (`stages.{i}.blocks.0`)")));
            }
            let (c, _, k, _) = first.get_unchecked("weight")?.dims4()?;
            let downsample = if i == 0 && c == prev {
                None
            } else {
                let norm = LayerNorm2d::load(prev, svb.pp("downsample.0"))?;
                let conv = Conv2dConfig { stride: 2, ..Default::default() };
                Some((norm, candle_nn::conv2d(prev, c, 2, conv, svb.pp("downsample.1"))?))
            };
            let mut blocks = Vec::new();
            while svb.contains_tensor(&format!("blocks.{}.conv_dw.weight", blocks.len())) {
                blocks.push(Block::load(c, k, svb.pp(format!("blocks.{}", blocks.len())))?);
            }
            stages.push(Stage { downsample, blocks });
            prev = c;
        }
        Ok(Self { stem_conv, stem_norm, stages, width: prev })
    }

    /// Channels of the stage-4 map (1,536 for ConvNeXt-L).
    pub fn width(&self) -> usize {
        self.width
    }

    /// (B, 3, S, S) -> the stage-4 map (B, C, S/32, S/32).
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let mut x = self.stem_norm.forward(&self.stem_conv.forward(pixels)?)?;
        for stage in &self.stages {
            if let Some((norm, conv)) = &stage.downsample {
                x = conv.forward(&norm.forward(&x)?)?;
            }
            for block in &stage.blocks {
                x = block.forward(&x)?;
            }
        }
        Ok(x)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;

    #[test]
    fn depthwise_conv_matches_a_grouped_conv2d() {
        let dev = Device::Cpu;
        let (c, k) = (3, 7);
        let x = Tensor::randn(0f32, 1.0, (2, c, 9, 6), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (c, 1, k, k), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, c, &dev).unwrap();
        let mut map = std::collections::HashMap::new();
        map.insert("weight".to_string(), w.clone());
        map.insert("bias".to_string(), b.clone());
        let vb = VarBuilder::from_tensors(map, DType::F32, &dev);
        let ours = DepthwiseConv::load(c, k, vb).unwrap().forward(&x).unwrap();
        let want = x.conv2d(&w, 3, 1, 1, c).unwrap().broadcast_add(&b.reshape((1, c, 1, 1)).unwrap()).unwrap();
        let diff = (ours - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5, "{diff}");
    }
}
