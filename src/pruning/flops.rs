//! The FitPrune FLOPs model (DESIGN §3): multiply-accumulates spent on visual tokens in the
//! decoder, generalised from the authors' hard-coded LLaVA-1.5-7B shape to any config (GQA-aware).
//!
//! Per layer with n visual tokens (d hidden, m intermediate, d_kv = kv_heads * head_dim):
//! `qkv = n*d*(d + 2*d_kv)`, `attn = 2*n*n*d`, `rest = n*d*d + 3*n*d*m`. A layer that prunes
//! pays `qkv + attn` at the count it received and `rest` at the count it keeps.

use crate::model::config::TextConfig;

/// Decoder shape for FLOPs accounting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlopsModel {
    /// Decoder layers.
    pub layers: usize,
    /// Hidden size d.
    pub hidden: u64,
    /// MLP intermediate size m.
    pub intermediate: u64,
    /// Key/value width d_kv = kv_heads * head_dim.
    pub kv_dim: u64,
}

impl FlopsModel {
    /// The model for a decoder config.
    pub fn from_config(cfg: &TextConfig) -> Self {
        Self {
            layers: cfg.num_hidden_layers,
            hidden: cfg.hidden_size as u64,
            intermediate: cfg.intermediate_size as u64,
            kv_dim: (cfg.kv_heads() * cfg.head_dim()) as u64,
        }
    }

    /// LLaVA-1.5-7B (Vicuna-7B): the shape the authors hard-coded.
    pub fn llava15_7b() -> Self {
        Self { layers: 32, hidden: 4096, intermediate: 11008, kv_dim: 4096 }
    }

    /// q, k and v projections of n tokens.
    pub fn qkv(&self, n: u64) -> u128 {
        u128::from(n) * u128::from(self.hidden) * u128::from(self.hidden + 2 * self.kv_dim)
    }

    /// Attention scores and the weighted sum over values for n tokens.
    pub fn attn(&self, n: u64) -> u128 {
        2 * u128::from(n) * u128::from(n) * u128::from(self.hidden)
    }

    /// Output projection and the MLP for n tokens.
    pub fn rest(&self, n: u64) -> u128 {
        let (n, d, m) = (u128::from(n), u128::from(self.hidden), u128::from(self.intermediate));
        n * d * d + 3 * n * d * m
    }

    /// One whole layer at n tokens.
    pub fn layer(&self, n: u64) -> u128 {
        self.qkv(n) + self.attn(n) + self.rest(n)
    }

    /// All layers at n tokens: the unpruned cost.
    pub fn unpruned(&self, n: u64) -> u128 {
        self.layers as u128 * self.layer(n)
    }

    /// Cost of n visual tokens under per-layer deletions (missing layers delete nothing).
    pub fn pruned(&self, n: u64, deletions: &[usize]) -> u128 {
        self.pruned_with_text(n, 0, deletions)
    }

    /// Cost of a whole prompt (n visual + `text` other rows, same formulas) under per-layer
    /// deletions of visual tokens; `text = 0` is the FitPrune model.
    pub fn pruned_with_text(&self, n: u64, text: u64, deletions: &[usize]) -> u128 {
        let mut left = n;
        let mut total = 0;
        for l in 0..self.layers {
            total += self.qkv(left + text) + self.attn(left + text);
            left -= (deletions.get(l).copied().unwrap_or(0) as u64).min(left);
            total += self.rest(left + text);
        }
        total
    }

    /// Visual tokens left after every layer has pruned.
    pub fn kept(&self, n: u64, deletions: &[usize]) -> u64 {
        deletions.iter().take(self.layers).fold(n, |left, &d| left - (d as u64).min(left))
    }

    /// Fraction of the unpruned cost a recipe removes, in [0, 1].
    pub fn reduction(&self, n: u64, deletions: &[usize]) -> f64 {
        let full = self.unpruned(n);
        if full == 0 {
            return 0.0;
        }
        1.0 - self.pruned(n, deletions) as f64 / full as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The authors' `calculate_origin_flops()` for LLaVA-1.5-7B, transcribed literally.
    fn authors_origin() -> u128 {
        ((576 * 4096 * 4096 * 3 + 576 * 576 * 4096 + 576 * 4096 * 576 + 576 * 4096 * 4096) + (4096 * 11008 * 576 * 3))
            * 32
    }

    /// The authors' `rest_flops(tk_num, layer_idx)`.
    fn authors_rest(tk: u128, layer: u128) -> u128 {
        let mut r = tk * 4096 * 4096 + 3 * 11008 * 4096 * tk;
        let left = 31 - layer;
        r += ((tk * 4096 * 4096 * 3 + tk * tk * 4096 + tk * 4096 * tk + tk * 4096 * 4096) + (4096 * 11008 * tk * 3))
            * left;
        r
    }

    #[test]
    fn matches_the_authors_formula_for_llava_7b() {
        let f = FlopsModel::llava15_7b();
        assert_eq!(f.unpruned(576), authors_origin());
        for (n, l) in [(576u64, 0usize), (300, 5), (17, 31)] {
            let remaining = (f.layers - 1 - l) as u128;
            assert_eq!(f.rest(n) + remaining * f.layer(n), authors_rest(n.into(), l as u128));
        }
        // The per-layer qkv + attn term of fit_model.
        assert_eq!(f.qkv(576) + f.attn(576), 576 * 4096 * 4096 * 3 + 576 * 576 * 4096 * 2);
    }

    #[test]
    fn hand_computed_small_gqa_model() {
        // d=4, m=6, d_kv=2, 2 layers, n=3.
        let f = FlopsModel { layers: 2, hidden: 4, intermediate: 6, kv_dim: 2 };
        assert_eq!(f.qkv(3), 3 * 4 * 8);
        assert_eq!(f.attn(3), 2 * 9 * 4);
        assert_eq!(f.rest(3), 3 * 16 + 3 * 3 * 4 * 6);
        assert_eq!(f.layer(3), 96 + 72 + 264);
        assert_eq!(f.unpruned(3), 2 * 432);
        // Delete 2 at layer 0: layer 0 pays qkv+attn at 3, rest at 1; layer 1 pays everything at 1.
        let pruned = 96 + 72 + (16 + 72) + f.layer(1);
        assert_eq!(f.pruned(3, &[2, 0]), pruned);
        assert_eq!(f.kept(3, &[2, 5]), 0);
        // One text row rides along: layer 0 sees 4 rows, keeps 2; layer 1 sees 2.
        assert_eq!(f.pruned_with_text(3, 1, &[2, 0]), f.qkv(4) + f.attn(4) + f.rest(2) + f.layer(2));
        assert!((f.reduction(3, &[2, 0]) - (1.0 - pruned as f64 / 864.0)).abs() < 1e-12);
        assert_eq!(f.reduction(3, &[]), 0.0);
    }

    #[test]
    fn authors_published_schemes_reduce_roughly_their_budget() {
        // 50% scheme from the authors' modeling_llama.py.
        let d = [
            3, 7, 49, 24, 29, 17, 59, 41, 26, 8, 10, 6, 2, 5, 7, 2, 30, 3, 13, 27, 5, 23, 2, 1, 0, 0, 1, 1, 2, 0, 0, 0,
        ];
        let r = FlopsModel::llava15_7b().reduction(576, &d);
        assert!((0.45..0.56).contains(&r), "{r}");
    }
}
