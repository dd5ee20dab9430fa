//! The decoder layer's gated MLP, and its `act(gate) * up` done in place on the CPU for SiLU
//! (Llama, Mistral).
//!
//! The composite (`silu`, then `*`) allocates two (rows, intermediate) tensors per layer — 6.7 MB
//! each on the bench preset's 594-token prompt — and makes two passes; here the gate
//! projection's fresh output is overwritten in one pass, split over rows on the CPU's threads.
//!
//! Bit-exact with the composite on f32: candle's CPU SiLU is `v / (1 + exp(-v))` (without the
//! `mkl` feature, which this crate does not enable) and its product is a plain `*`, which is
//! what runs here. Other activations, dtypes and devices take the composite unchanged.

use candle_core::{CpuStorage, DType, InplaceOp2, Layout, Tensor};
use rayon::prelude::*;

use candle_nn::VarBuilder;

use super::config::{Activation, TextConfig};
use super::dense::Dense;
use super::llama::linear;
use super::Result;

/// The decoder layer's gated MLP: `down(act(gate(x)) * up(x))`.
#[derive(Debug, Clone)]
pub(super) struct Mlp {
    gate_proj: Dense,
    up_proj: Dense,
    down_proj: Dense,
    act: Activation,
}

impl Mlp {
    pub(super) fn load(vb: VarBuilder, cfg: &TextConfig) -> Result<Self> {
        let (d, m, b) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        Ok(Self {
            gate_proj: Dense::new(&linear(d, m, b, vb.pp("gate_proj"))?)?,
            up_proj: Dense::new(&linear(d, m, b, vb.pp("up_proj"))?)?,
            down_proj: Dense::new(&linear(m, d, b, vb.pp("down_proj"))?)?,
            act: cfg.hidden_act,
        })
    }

    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gated = act_mul(self.act, self.gate_proj.forward(x)?, &self.up_proj.forward(x)?)?;
        self.down_proj.forward(&gated)
    }
}

/// Rows of work per thread task: big enough that scheduling costs nothing next to the `exp`s.
const CHUNK: usize = 16 * 1024;

/// `act(gate) * up` for same-shaped `gate` (consumed) and `up`.
pub(super) fn act_mul(act: Activation, gate: Tensor, up: &Tensor) -> Result<Tensor> {
    let fused = act == Activation::Silu
        && gate.device().is_cpu()
        && gate.dtype() == DType::F32
        && up.dtype() == DType::F32
        && gate.is_contiguous()
        && up.is_contiguous()
        && gate.dims() == up.dims();
    if !fused {
        return Ok((act.forward(&gate)? * up)?);
    }
    gate.inplace_op2(up, &SiluMul)?;
    Ok(gate)
}

struct SiluMul;

impl InplaceOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul"
    }

    fn cpu_fwd(&self, dst: &mut CpuStorage, dst_l: &Layout, up: &CpuStorage, up_l: &Layout) -> candle_core::Result<()> {
        let (CpuStorage::F32(gate), CpuStorage::F32(up), Some((g0, g1)), Some((u0, u1))) =
            (dst, up, dst_l.contiguous_offsets(), up_l.contiguous_offsets())
        else {
            candle_core::bail!("silu-mul: contiguous f32 operands expected");
        };
        let (gate, up) = (&mut gate[g0..g1], &up[u0..u1]);
        if gate.len() != up.len() {
            candle_core::bail!("silu-mul: operands differ in size");
        }
        gate.par_chunks_mut(CHUNK).zip(up.par_chunks(CHUNK)).for_each(|(g, u)| {
            for (g, &u) in g.iter_mut().zip(u) {
                *g = (*g / (1.0 + (-*g).exp())) * u;
            }
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    fn bits(t: &Tensor) -> Vec<u32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(f32::to_bits).collect()
    }

    #[test]
    fn matches_the_composite_bit_for_bit() {
        let dev = Device::Cpu;
        // More elements than one chunk, and not a multiple of it.
        let gate = (Tensor::randn(0f32, 4.0, (1, 37, 1000), &dev).unwrap() - 1.0).unwrap();
        let up = Tensor::randn(0f32, 1.0, (1, 37, 1000), &dev).unwrap();
        let want = (candle_nn::ops::silu(&gate).unwrap() * &up).unwrap();
        let got = act_mul(Activation::Silu, gate.copy().unwrap(), &up).unwrap();
        assert_eq!(bits(&got), bits(&want));
        // Another activation takes the composite.
        let want = (Activation::Gelu.forward(&gate).unwrap() * &up).unwrap();
        let got = act_mul(Activation::Gelu, gate.copy().unwrap(), &up).unwrap();
        assert_eq!(bits(&got), bits(&want));
    }
}
