//! FitPrune's token scores from one layer's attention (DESIGN §3).
//!
//! With `A` the head-wise maximum of the softmax probabilities, for visual token j:
//! `self_j = Σ_{i visual} A[i, j] / n` (attention it receives from the image) and
//! `cross_j = Σ_{t cross rows} A[t, j]` (attention it receives from the text after the image).
//! Inference deletes the tokens with the lowest `cross_j * self_j`; calibration works on the two
//! scores separately.
//!
//! Several images: every visual token of every image is in the visual set, and the cross rows
//! are the text rows after the first visual token (text between two images attends to the
//! first image and is query text for it). With one image this is exactly the authors' rule.

use candle_core::{DType, Tensor};

use super::PruneError;

/// Self and cross scores of the visual tokens, in visual-set order.
#[derive(Debug, Clone, PartialEq)]
pub struct VisualScores {
    /// Attention each visual token receives from visual rows, divided by the visual count.
    pub self_attn: Vec<f32>,
    /// Attention each visual token receives from the cross (text) rows, summed.
    pub cross_attn: Vec<f32>,
}

/// Visual and cross rows among the current rows of a prefill.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowRoles {
    /// Current row indices of visual tokens, ascending.
    pub visual: Vec<u32>,
    /// Current row indices of text after the first visual token, ascending.
    pub cross: Vec<u32>,
}

impl RowRoles {
    /// Roles from a per-row visual flag.
    pub fn from_flags(is_visual: &[bool]) -> Self {
        let first = is_visual.iter().position(|&v| v);
        let mut visual = Vec::new();
        let mut cross = Vec::new();
        for (i, &v) in is_visual.iter().enumerate() {
            if v {
                visual.push(i as u32);
            } else if first.is_some_and(|f| i > f) {
                cross.push(i as u32);
            }
        }
        Self { visual, cross }
    }
}

/// Head-wise maximum of (1, heads, rows, keys) probabilities: (rows, keys) f32.
pub fn head_max(probs: &Tensor) -> Result<Tensor, PruneError> {
    Ok(probs.squeeze(0)?.max(0)?.to_dtype(DType::F32)?)
}

/// Scores of the visual tokens from head-max attention `a` (rows, keys) of a prefill, where
/// row i and key i are the same token.
pub fn visual_scores(a: &Tensor, roles: &RowRoles) -> Result<VisualScores, PruneError> {
    let n = roles.visual.len();
    if n == 0 {
        return Ok(VisualScores { self_attn: Vec::new(), cross_attn: Vec::new() });
    }
    let device = a.device();
    let vis = Tensor::new(roles.visual.as_slice(), device)?;
    let cols = a.index_select(&vis, 1)?;
    let self_attn = (cols.index_select(&vis, 0)?.sum(0)? / n as f64)?.to_vec1::<f32>()?;
    let cross_attn = if roles.cross.is_empty() {
        vec![0.0; n]
    } else {
        let cross = Tensor::new(roles.cross.as_slice(), device)?;
        cols.index_select(&cross, 0)?.sum(0)?.to_vec1::<f32>()?
    };
    Ok(VisualScores { self_attn, cross_attn })
}

/// Positions (in visual-set order) of the `d` tokens with the lowest `cross * self`, ascending
/// by score; ties keep the earlier token first.
pub fn lowest_products(scores: &VisualScores, d: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.self_attn.len()).collect();
    let product = |j: usize| scores.cross_attn[j] * scores.self_attn[j];
    order.sort_by(|&a, &b| product(a).total_cmp(&product(b)).then(a.cmp(&b)));
    order.truncate(d.min(order.len()));
    order
}

/// Calibration's prefix rule: sort `values` ascending and delete the longest prefix whose removal
/// leaves at least `reference - reference * alpha` of the mass (the authors stop at the first
/// prefix length i that breaks the bound and delete i - 1). Sums run in f64.
pub fn prefix_deletions(values: &[f32], reference: f64, alpha: f64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[a].total_cmp(&values[b]).then(a.cmp(&b)));
    let total: f64 = values.iter().map(|&v| f64::from(v)).sum();
    let bound = reference - reference * alpha;
    let mut removed = 0.0;
    let mut count = values.len().saturating_sub(1);
    for (i, &j) in order.iter().enumerate() {
        if total - removed < bound {
            count = i.saturating_sub(1);
            break;
        }
        removed += f64::from(values[j]);
    }
    order.truncate(count);
    order
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn roles_put_text_after_the_first_image_in_cross() {
        let r = RowRoles::from_flags(&[false, false, true, true, false, true, false, false]);
        assert_eq!(r.visual, vec![2, 3, 5]);
        assert_eq!(r.cross, vec![4, 6, 7]);
        assert!(RowRoles::from_flags(&[false, false]).cross.is_empty());
    }

    #[test]
    fn scores_follow_the_definition() {
        // rows/keys: 0 text, 1-2 visual, 3-4 text after.
        #[rustfmt::skip]
        let a = Tensor::new(&[
            [1.0f32, 0.0, 0.0, 0.0, 0.0],
            [0.5, 0.5, 0.0, 0.0, 0.0],
            [0.2, 0.3, 0.5, 0.0, 0.0],
            [0.1, 0.2, 0.3, 0.4, 0.0],
            [0.1, 0.4, 0.1, 0.2, 0.2],
        ], &Device::Cpu).unwrap();
        let roles = RowRoles::from_flags(&[false, true, true, false, false]);
        let s = visual_scores(&a, &roles).unwrap();
        assert_eq!(s.self_attn, vec![(0.5 + 0.3) / 2.0, 0.5 / 2.0]);
        assert!((s.cross_attn[0] - 0.6).abs() < 1e-6 && (s.cross_attn[1] - 0.4).abs() < 1e-6);
        // products 0.24 and 0.1: token 1 (visual index 1) goes first.
        assert_eq!(lowest_products(&s, 1), vec![1]);
        assert_eq!(lowest_products(&s, 5), vec![1, 0]);
    }

    #[test]
    fn head_max_takes_the_maximum_over_heads() {
        let p = Tensor::new(&[[[[0.2f32, 0.8], [0.6, 0.4]], [[0.7, 0.3], [0.1, 0.9]]]], &Device::Cpu).unwrap();
        assert_eq!(head_max(&p).unwrap().to_vec2::<f32>().unwrap(), vec![vec![0.7, 0.8], vec![0.6, 0.9]]);
    }

    #[test]
    fn prefix_rule_matches_the_authors_loop() {
        let v = [0.4f32, 0.1, 0.3, 0.2]; // ascending: 1 (0.1), 3 (0.2), 2 (0.3), 0 (0.4); total 1.0
                                         // alpha 0.35 with reference 1.0: bound 0.65. Removing 0.1 leaves 0.9, +0.2 leaves 0.7,
                                         // +0.3 leaves 0.4 < 0.65 -> first breaking i is 3 -> delete i - 1 = 2 tokens.
        assert_eq!(prefix_deletions(&v, 1.0, 0.35), vec![1, 3]);
        assert!(prefix_deletions(&v, 1.0, 0.0).is_empty());
        // The current mass already below the bound: nothing is deleted.
        assert!(prefix_deletions(&v, 2.0, 0.1).is_empty());
        // Never breaking within the checked prefixes: all but the largest.
        assert_eq!(prefix_deletions(&v, 1.0, 1.0), vec![1, 3, 2]);
    }
}
