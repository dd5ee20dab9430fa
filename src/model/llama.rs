//! Llama decoder (Touvron et al. 2023; transformers' `LlamaModel`) with the hooks FitPrune needs.
//!
//! Unlike candle-transformers' llama, every layer here
//! - applies RoPE at explicit per-token positions, so pruned tokens leave gaps that the kept
//!   tokens do not close up (DESIGN §3: kept tokens keep their original position ids);
//! - owns a KV cache whose length may differ from other layers' (a pruning layer caches every
//!   token it saw, later layers only the kept ones);
//! - can hand its softmax attention probabilities to a [`DecoderHook`], which may answer with the
//!   rows to keep: the rest are removed from the attention output and from the residual before
//!   `o_proj` and the residual add.
//!
//! Masks are built from positions rather than indices: a key is visible to a query when its
//! position is not later than the query's (and, with Mistral's `sliding_window` W, fewer than W
//! positions earlier), which stays correct whatever rows were removed.

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Embedding, Linear, RmsNorm, VarBuilder};

use super::dense::Dense;
use super::fused_attn;
use super::visibility::Visibility;

use super::config::TextConfig;
use super::Result;

/// Receives attention probabilities during a forward pass and may prune rows.
pub trait DecoderHook {
    /// Whether `layer` must materialise its attention probabilities for this pass.
    fn wants_attention(&self, layer: usize) -> bool;

    /// Called after the softmax of `layer` with probabilities shaped
    /// (batch, heads, rows, keys) and the original positions of the current rows.
    /// Returns the ascending indices (into the current rows) to keep, or `None` to keep all.
    fn on_attention(&mut self, layer: usize, probs: &Tensor, positions: &[u32]) -> Result<Option<Vec<u32>>>;
}

/// Checks a hook's answer: ascending, in range, not empty.
pub(super) fn check_keep(keep: &[u32], rows: usize) -> Result<()> {
    let ascending = keep.windows(2).all(|w| w[0] < w[1]);
    if keep.is_empty() || !ascending || keep.last().is_some_and(|&k| k as usize >= rows) {
        return Err(super::ModelError::InvalidInput(format!(
            "a decoder hook must keep an ascending, non-empty subset of the {rows} rows"
        )));
    }
    Ok(())
}

/// A hook that observes nothing and prunes nothing.
pub struct NoHook;

impl DecoderHook for NoHook {
    fn wants_attention(&self, _layer: usize) -> bool {
        false
    }
    fn on_attention(&mut self, _: usize, _: &Tensor, _: &[u32]) -> Result<Option<Vec<u32>>> {
        Ok(None)
    }
}

/// Tokens of decode growth a cache reserves when its owner does not say how many it needs.
const DEFAULT_GROWTH: usize = 256;

/// Keys and values one layer has seen, with their positions (for masking).
///
/// The buffers are allocated once, on the first append, for that append's rows plus the
/// cache's `growth` (the decode tokens its sequence was admitted with), and written in place;
/// so a layer after a pruning layer allocates only the rows it keeps, and what the scheduler
/// accounts for a sequence is what it holds. Past the reservation a buffer grows by `growth`
/// more tokens. Not `Clone`: two copies would overwrite each other's tokens.
#[derive(Debug)]
pub struct LayerCache {
    /// (batch, kv_heads, capacity, head_dim) each; the first `positions.len()` tokens are valid.
    kv: Option<(Tensor, Tensor)>,
    positions: Vec<u32>,
    growth: usize,
}

impl Default for LayerCache {
    fn default() -> Self {
        Self::with_growth(DEFAULT_GROWTH)
    }
}

impl LayerCache {
    /// An empty cache that reserves `growth` tokens beyond its first append.
    pub fn with_growth(growth: usize) -> Self {
        Self { kv: None, positions: Vec::new(), growth }
    }

    /// Number of cached tokens.
    pub fn len(&self) -> usize {
        self.positions.len()
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }

    /// Positions of the cached tokens, in cache order.
    pub fn positions(&self) -> &[u32] {
        &self.positions
    }

    /// Tokens the buffers have room for (0 before the first append).
    pub fn capacity(&self) -> usize {
        self.kv.as_ref().and_then(|(k, _)| k.dim(2).ok()).unwrap_or(0)
    }

    /// Bytes the key and value buffers occupy.
    pub fn allocated_bytes(&self) -> usize {
        self.kv.as_ref().map_or(0, |(k, v)| (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes())
    }

    /// Forgets every token from `len` on (a failed pass is undone this way before a retry).
    pub fn truncate(&mut self, len: usize) {
        self.positions.truncate(len);
    }

    /// Appends (batch, kv_heads, new, head_dim) keys/values and returns the whole cache.
    pub(super) fn append(&mut self, k: Tensor, v: Tensor, positions: &[u32]) -> Result<(Tensor, Tensor)> {
        let (len, new) = (self.positions.len(), positions.len());
        let needed = len + new;
        if self.capacity() < needed {
            let (b, heads, _, hd) = k.dims4()?;
            let cap = needed + self.growth;
            let zeros = || Tensor::zeros((b, heads, cap, hd), k.dtype(), k.device());
            let (nk, nv) = (zeros()?, zeros()?);
            if let Some((ok, ov)) = &self.kv {
                nk.slice_set(&ok.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
                nv.slice_set(&ov.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
            }
            self.kv = Some((nk, nv));
        }
        let Some((bk, bv)) = &self.kv else {
            return Err(super::ModelError::InvalidInput("KV buffer missing after allocation".into()));
        };
        bk.slice_set(&k.contiguous()?, 2, len)?;
        bv.slice_set(&v.contiguous()?, 2, len)?;
        self.positions.extend_from_slice(positions);
        Ok((bk.narrow(2, 0, needed)?, bv.narrow(2, 0, needed)?))
    }
}

/// One [`LayerCache`] per decoder layer.
#[derive(Debug)]
pub struct KvCache {
    pub(super) layers: Vec<LayerCache>,
}

impl KvCache {
    /// An empty cache for `num_layers` layers (each reserving a default decode growth).
    pub fn new(num_layers: usize) -> Self {
        Self::with_growth(num_layers, DEFAULT_GROWTH)
    }

    /// An empty cache whose layers each reserve `growth` tokens beyond their prefill rows.
    pub fn with_growth(num_layers: usize, growth: usize) -> Self {
        Self { layers: (0..num_layers).map(|_| LayerCache::with_growth(growth)).collect() }
    }

    /// The cache of one layer.
    pub fn layer(&self, l: usize) -> &LayerCache {
        &self.layers[l]
    }

    /// Cached token count per layer.
    pub fn lengths(&self) -> Vec<usize> {
        self.layers.iter().map(LayerCache::len).collect()
    }

    /// Bytes all layers' buffers occupy.
    pub fn allocated_bytes(&self) -> usize {
        self.layers.iter().map(LayerCache::allocated_bytes).sum()
    }

    /// Undoes appends: layer l keeps its first `lengths[l]` tokens.
    pub fn truncate(&mut self, lengths: &[usize]) {
        for (layer, &len) in self.layers.iter_mut().zip(lengths) {
            layer.truncate(len);
        }
    }
}

/// Positions the device RoPE table covers at most; later positions (beyond any supported
/// context) are computed on the host per pass.
const MAX_TABLE_POSITIONS: usize = 1 << 18;

/// RoPE tables, computed like transformers' default rotary embedding (angles and cos/sin in
/// f32), once at load for every position of the model's context and kept on its device: a pass
/// gathers its rows' entries there instead of building and uploading tables each forward.
#[derive(Debug, Clone)]
pub(super) struct Rotary {
    pub(super) inv_freq: Vec<f32>,
    /// (positions, head_dim / 2) cos and sin in the model's dtype, on its device.
    cos: Tensor,
    sin: Tensor,
}

impl Rotary {
    pub(super) fn new(cfg: &TextConfig, dtype: DType, device: &Device) -> Result<Self> {
        let dim = cfg.head_dim();
        let theta = cfg.rope_theta as f32;
        let inv_freq: Vec<f32> = (0..dim).step_by(2).map(|i| 1.0 / theta.powf(i as f32 / dim as f32)).collect();
        let len = cfg.max_position_embeddings.clamp(1, MAX_TABLE_POSITIONS);
        let all: Vec<u32> = (0..len as u32).collect();
        let (cos, sin) = host_tables(&inv_freq, &all, dtype, device)?;
        Ok(Self { inv_freq, cos, sin })
    }

    /// cos and sin (rows, head_dim / 2) at the given positions, in the table's dtype.
    pub(super) fn tables(&self, positions: &[u32], device: &Device) -> Result<(Tensor, Tensor)> {
        let len = self.cos.dim(0)?;
        if positions.iter().any(|&p| p as usize >= len) {
            return host_tables(&self.inv_freq, positions, self.cos.dtype(), device);
        }
        let idx = Tensor::new(positions, device)?;
        Ok((self.cos.index_select(&idx, 0)?, self.sin.index_select(&idx, 0)?))
    }
}

/// cos and sin tables (rows, half) computed on the host (in f32) and uploaded.
pub(super) fn host_tables(
    inv_freq: &[f32],
    positions: &[u32],
    dtype: DType,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let half = inv_freq.len();
    let mut cos = Vec::with_capacity(positions.len() * half);
    let mut sin = Vec::with_capacity(positions.len() * half);
    for &p in positions {
        for &f in inv_freq {
            let a = p as f32 * f;
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    let shape = (positions.len(), half);
    let cos = Tensor::from_vec(cos, shape, device)?.to_dtype(dtype)?;
    let sin = Tensor::from_vec(sin, shape, device)?.to_dtype(dtype)?;
    Ok((cos, sin))
}

pub(super) fn linear(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    Ok(if bias { candle_nn::linear(in_dim, out_dim, vb)? } else { candle_nn::linear_no_bias(in_dim, out_dim, vb)? })
}

#[derive(Debug, Clone)]
pub(super) struct Attention {
    /// `q_proj`, `k_proj` and `v_proj` stacked into one (h + 2 kvh) * head_dim output: one gemm
    /// packs the activations once instead of three times (13% less projection time on the bench
    /// preset's 590 rows); every output element is the same dot product, bit for bit.
    qkv_proj: Dense,
    o_proj: Dense,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    pub(super) fn load(vb: VarBuilder, cfg: &TextConfig) -> Result<Self> {
        let (d, hd) = (cfg.hidden_size, cfg.head_dim());
        let (h, kvh, b) = (cfg.num_attention_heads, cfg.kv_heads(), cfg.attention_bias);
        let parts = [
            linear(d, h * hd, b, vb.pp("q_proj"))?,
            linear(d, kvh * hd, b, vb.pp("k_proj"))?,
            linear(d, kvh * hd, b, vb.pp("v_proj"))?,
        ];
        Ok(Self {
            qkv_proj: Dense::stacked(&parts)?,
            o_proj: Dense::new(&linear(h * hd, d, b, vb.pp("o_proj"))?)?,
            heads: h,
            kv_heads: kvh,
            head_dim: hd,
        })
    }

    /// Queries (batch, heads, rows, head_dim) and keys/values (batch, kv_heads, rows, head_dim),
    /// RoPE applied at the rows' positions (`cos`/`sin`: (rows, half) or (batch, rows, half)).
    pub(super) fn project(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, s, _) = x.dims3()?;
        let (h, kvh) = (self.heads, self.kv_heads);
        let qkv = self.qkv_proj.forward(x)?.reshape((b, s, h + 2 * kvh, self.head_dim))?;
        let split =
            |from: usize, n: usize| -> Result<Tensor> { Ok(qkv.narrow(2, from, n)?.transpose(1, 2)?.contiguous()?) };
        let (q, k, v) = (split(0, h)?, split(h, kvh)?, split(h + kvh, kvh)?);
        let q = candle_nn::rotary_emb::rope(&q, cos, sin)?;
        let k = candle_nn::rotary_emb::rope(&k, cos, sin)?;
        Ok((q, k, v))
    }

    /// Attention of `q` over keys/values `k`, `v` with the key visibility `vis`: the output
    /// before `o_proj`, (batch, rows, heads * head_dim), and optionally the probabilities (batch,
    /// heads, rows, keys) in f32. Without probabilities a fused kernel runs where one applies
    /// (`fused_attn`); the additive mask is only built for the eager path.
    pub(super) fn attend_keys(
        &self,
        q: &Tensor,
        k: Tensor,
        v: Tensor,
        vis: &Visibility<'_>,
        want_probs: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        if !want_probs && fused_attn::applies(q) {
            if let Some(shape) = fused_attn::fused_mask(vis.rows, vis.keys, vis.window) {
                if let Some(out) = fused_attn::attend(q, &k, &v, shape, scale)? {
                    return Ok((out, None));
                }
            }
        }
        let mask = vis.mask(q.device())?;
        // The CPU kernel where it applies (f32); the composite below elsewhere (CUDA, f16/bf16).
        if let Some(done) = super::attn_cpu::attend(q, &k, &v, mask, scale, want_probs)? {
            return Ok(done);
        }
        let (b, _, s, _) = q.dims4()?;
        let n_rep = self.heads / self.kv_heads;
        let k = candle_transformers::utils::repeat_kv(k, n_rep)?;
        let v = candle_transformers::utils::repeat_kv(v, n_rep)?;
        // Scaled in f32: in bf16/f16 models only the product itself is rounded to the half type.
        let scores = (q.matmul(&k.t()?)?.to_dtype(DType::F32)? * scale)?;
        let scores = match mask {
            Some(mask) => scores.broadcast_add(mask)?,
            None => scores,
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = probs.to_dtype(v.dtype())?.matmul(&v)?;
        let out = out.transpose(1, 2)?.reshape((b, s, self.heads * self.head_dim))?;
        Ok((out, want_probs.then_some(probs)))
    }

    /// Packed sequences' self-attention in one fused varlen call (`fused_attn::attend_packed`):
    /// (1, total, heads * head_dim), or `None` where no fused kernel applies.
    pub(super) fn attend_packed(
        &self,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        starts: &Tensor,
        max_len: usize,
        shape: fused_attn::FusedMask,
    ) -> Result<Option<Tensor>> {
        fused_attn::attend_packed(q, k, v, starts, max_len, shape, 1.0 / (self.head_dim as f64).sqrt())
    }

    /// One sequence's attention for a step: appends the step's keys/values to `cache` and
    /// attends over everything cached.
    fn attend(
        &self,
        x: &Tensor,
        step: &Step,
        cache: &mut LayerCache,
        want_probs: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (q, k, v) = self.project(x, &step.cos, &step.sin)?;
        let (k, v) = cache.append(k, v, &step.positions)?;
        // A layer whose cache held nothing before this pass sees exactly the step's rows as keys,
        // so it can share the step's mask; otherwise its own cached positions matter.
        let own = std::cell::OnceCell::new();
        let shares = cache.len() == step.positions.len();
        let vis = Visibility {
            rows: &step.positions,
            keys: cache.positions(),
            window: step.window,
            built: if shares { &step.mask } else { &own },
        };
        self.attend_keys(&q, k, v, &vis, want_probs)
    }
}

#[derive(Debug, Clone)]
pub(super) struct DecoderLayer {
    pub(super) self_attn: Attention,
    mlp: super::gated_mlp::Mlp,
    pub(super) input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
}

/// Per-pass inputs shared by the layers until a layer prunes rows.
struct Step {
    positions: Vec<u32>,
    /// The decoder's sliding window, if any.
    window: Option<u32>,
    cos: Tensor,
    sin: Tensor,
    /// Mask of the rows against themselves, built on first use and shared by every layer
    /// until rows are removed.
    mask: std::cell::OnceCell<Option<Tensor>>,
}

impl Step {
    fn new(positions: Vec<u32>, window: Option<u32>, cos: Tensor, sin: Tensor) -> Self {
        Self { positions, window, cos, sin, mask: std::cell::OnceCell::new() }
    }
}

impl DecoderLayer {
    /// Row removal (if any), `o_proj`, residual add, then the MLP block.
    pub(super) fn finish(&self, x: &Tensor, attn: &Tensor, keep: Option<&Tensor>) -> Result<Tensor> {
        let (attn, residual) = match keep {
            Some(idx) => (attn.index_select(idx, 1)?, x.index_select(idx, 1)?),
            None => (attn.clone(), x.clone()),
        };
        let x = (residual + self.self_attn.o_proj.forward(&attn)?)?;
        let mlp = self.mlp.forward(&self.post_attention_layernorm.forward(&x)?)?;
        Ok((x + mlp)?)
    }

    fn load(vb: VarBuilder, cfg: &TextConfig) -> Result<Self> {
        let (d, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        Ok(Self {
            self_attn: Attention::load(vb.pp("self_attn"), cfg)?,
            mlp: super::gated_mlp::Mlp::load(vb.pp("mlp"), cfg)?,
            input_layernorm: candle_nn::rms_norm(d, eps, vb.pp("input_layernorm"))?,
            post_attention_layernorm: candle_nn::rms_norm(d, eps, vb.pp("post_attention_layernorm"))?,
        })
    }
}

/// The decoder output of one forward pass.
#[derive(Debug)]
pub struct DecoderOutput {
    /// Final-normed hidden states of the rows that survived, (batch, rows, hidden).
    pub hidden: Tensor,
    /// Original positions of those rows.
    pub positions: Vec<u32>,
}

/// `LlamaForCausalLM`: embeddings, prunable decoder layers, final norm and LM head.
#[derive(Debug, Clone)]
pub struct Llama {
    pub(super) embed_tokens: Embedding,
    pub(super) layers: Vec<DecoderLayer>,
    pub(super) norm: RmsNorm,
    pub(super) lm_head: Linear,
    pub(super) rotary: Rotary,
    /// Mistral's `sliding_window` (`None` for Llama): enforced by every mask.
    pub(super) window: Option<u32>,
}

impl Llama {
    /// Loads from `vb` (the `LlamaModel` prefix) and `lm_head` (`None` ties it to the embeddings).
    pub fn load(vb: VarBuilder, lm_head: Option<VarBuilder>, cfg: &TextConfig) -> Result<Self> {
        let embed_tokens = candle_nn::embedding(cfg.vocab_size, cfg.hidden_size, vb.pp("embed_tokens"))?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::load(vb.pp(format!("layers.{i}")), cfg))
            .collect::<Result<Vec<_>>>()?;
        let norm = candle_nn::rms_norm(cfg.hidden_size, cfg.rms_norm_eps, vb.pp("norm"))?;
        let lm_head = match lm_head {
            Some(vb) => candle_nn::linear_no_bias(cfg.hidden_size, cfg.vocab_size, vb)?,
            None => Linear::new(embed_tokens.embeddings().clone(), None),
        };
        let window = cfg.sliding_window.map(|w| u32::try_from(w).unwrap_or(u32::MAX));
        let rotary = Rotary::new(cfg, vb.dtype(), vb.device())?;
        Ok(Self { embed_tokens, layers, norm, lm_head, rotary, window })
    }

    /// Number of decoder layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Token embeddings (batch, tokens, hidden) for ids (batch, tokens).
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(self.embed_tokens.forward(ids)?)
    }

    /// Runs the decoder over `embeds` (batch, rows, hidden) at `positions`, appending to `cache`.
    /// The hook sees attention where it asks for it and may remove rows (see module docs).
    pub fn forward(
        &self,
        embeds: &Tensor,
        positions: &[u32],
        cache: &mut KvCache,
        hook: &mut dyn DecoderHook,
    ) -> Result<DecoderOutput> {
        let (_, rows, _) = embeds.dims3()?;
        if rows != positions.len() || cache.layers.len() != self.layers.len() {
            return Err(super::ModelError::InvalidInput(format!(
                "decoder got {rows} rows for {} positions and a {}-layer cache",
                positions.len(),
                cache.layers.len()
            )));
        }
        let device = embeds.device();
        let (cos, sin) = self.rotary.tables(positions, device)?;
        let mut step = Step::new(positions.to_vec(), self.window, cos, sin);
        let mut x = embeds.clone();
        for (l, layer) in self.layers.iter().enumerate() {
            let normed = layer.input_layernorm.forward(&x)?;
            let want = hook.wants_attention(l);
            let (attn, probs) = layer.self_attn.attend(&normed, &step, &mut cache.layers[l], want)?;
            let keep = match probs {
                Some(p) => hook.on_attention(l, &p, &step.positions)?,
                None => None,
            };
            if let Some(keep) = &keep {
                check_keep(keep, step.positions.len())?;
            }
            let keep_idx = match keep {
                Some(keep) if keep.len() < step.positions.len() => {
                    let idx = Tensor::new(keep.as_slice(), device)?;
                    step = Step::new(
                        keep.iter().map(|&i| step.positions[i as usize]).collect(),
                        self.window,
                        step.cos.index_select(&idx, 0)?,
                        step.sin.index_select(&idx, 0)?,
                    );
                    Some(idx)
                }
                _ => None,
            };
            x = layer.finish(&x, &attn, keep_idx.as_ref())?;
        }
        Ok(DecoderOutput { hidden: self.norm.forward(&x)?, positions: step.positions })
    }

    /// The attention half of layer `l` on a fresh prefill state `x` (1, rows, hidden) at
    /// `positions`: the output before `o_proj` and the probabilities (1, heads, rows, rows).
    /// Calibration uses this with [`Self::layer_finish`] to branch on pruning decisions.
    pub fn layer_attention(&self, l: usize, x: &Tensor, positions: &[u32]) -> Result<(Tensor, Tensor)> {
        let layer = &self.layers[l];
        let (cos, sin) = self.rotary.tables(positions, x.device())?;
        let step = Step::new(positions.to_vec(), self.window, cos, sin);
        let normed = layer.input_layernorm.forward(x)?;
        let (attn, probs) = layer.self_attn.attend(&normed, &step, &mut LayerCache::default(), true)?;
        let probs = probs.ok_or_else(|| super::ModelError::InvalidInput("attention probabilities missing".into()))?;
        Ok((attn, probs))
    }

    /// The rest of layer `l` after [`Self::layer_attention`]: keeps the rows `keep` (all if
    /// `None`) of `x` and `attn`, then `o_proj`, residual and MLP.
    pub fn layer_finish(&self, l: usize, x: &Tensor, attn: &Tensor, keep: Option<&[u32]>) -> Result<Tensor> {
        let idx = keep.map(|k| Tensor::new(k, x.device())).transpose()?;
        self.layers[l].finish(x, attn, idx.as_ref())
    }

    /// Logits (batch, vocab) in f32 of the last row of a last layer's output `x` (batch, rows,
    /// hidden) before the final norm (the end of a layer-by-layer pass).
    pub fn final_logits(&self, x: &Tensor) -> Result<Tensor> {
        self.last_logits(&self.norm.forward(x)?)
    }

    /// Logits (batch, vocab) in f32 of the last row of `hidden` (batch, rows, hidden).
    pub fn last_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let rows = hidden.dim(1)?;
        let last = hidden.narrow(1, rows - 1, 1)?.squeeze(1)?;
        Ok(self.lm_head.forward(&last)?.to_dtype(DType::F32)?)
    }

    /// Logits (batch, rows, vocab) in f32 for every row (used by parity tests).
    pub fn all_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(self.lm_head.forward(hidden)?.to_dtype(DType::F32)?)
    }
}

/// Log-softmax over the last dimension, in f32.
pub fn log_softmax(logits: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?)
}
