//! Calibration: fit per-layer deletion counts to FLOPs budgets (the authors'
//! `statistical_analysis.py`, DESIGN §3), sharing work the naive search repeats.
//!
//! The authors re-run every decoder layer on every sample for each alpha of the binary search,
//! and the statistics pass once per budget. Here one statistics pass serves all budgets, and each
//! sample's pruned passes live in a trie keyed by the deletions made so far: the hidden state
//! entering layer l depends only on which rows earlier layers removed, so any alpha (of any
//! budget) that makes the same decisions reuses the same layer evaluations. The unpruned chain is
//! the statistics pass itself. A fit stops as soon as the cost already spent rules the budget
//! out. Hidden states are memoised up to a byte limit; past it the least recently used are
//! dropped and recomputed from their parents when needed again. Results are identical to the
//! naive search by construction; the evaluation counts of both are reported.

use std::collections::HashMap;

use candle_core::Tensor;

use crate::model::PreparedPrompt;

use super::flops::FlopsModel;
use super::layers::LayerRunner;
use super::score::{prefix_deletions, RowRoles, VisualScores};
use super::PruneError;

/// What to fit.
#[derive(Debug, Clone)]
pub struct CalibrateOptions {
    /// FLOPs budgets: fractions of visual-token FLOPs to remove, each in (0, 1).
    pub budgets: Vec<f64>,
    /// Binary search stops when the alpha interval is at most this wide (authors: 0.01).
    pub tolerance: f64,
    /// Bytes of hidden states the memo may hold; past it the least recently used are dropped
    /// and recomputed from their parents if needed again (results do not change, work grows).
    pub cache_bytes: usize,
}

/// Default memo size: 4 GiB (a LLaVA-1.5-7B node holds two f16 tensors of about 5 MB each).
pub const DEFAULT_CACHE_BYTES: usize = 4 << 30;

impl Default for CalibrateOptions {
    fn default() -> Self {
        Self { budgets: vec![0.3, 0.5, 0.7], tolerance: 0.01, cache_bytes: DEFAULT_CACHE_BYTES }
    }
}

/// The recipe fitted for one budget.
#[derive(Debug, Clone, PartialEq)]
pub struct FittedBudget {
    /// Requested budget.
    pub budget: f64,
    /// Smallest alpha that met the budget; `None` if even alpha = 1 did not.
    pub alpha: Option<f64>,
    /// Per-layer deletions (sum over samples, floor-divided by the sample count).
    pub deletions: Vec<usize>,
    /// Reduction of the recipe under the FLOPs model at the fitted token count.
    pub achieved_reduction: f64,
}

/// Work done, against what the authors' procedure would have done for the same results.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EvalCounts {
    /// Attention halves computed (layer input -> probabilities).
    pub attention: u64,
    /// MLP halves computed (row removal, o_proj, residual, MLP).
    pub mlp: u64,
    /// Full layer evaluations of the naive search: a statistics pass per budget plus every
    /// layer walked by every alpha step, per sample.
    pub naive_layers: u64,
    /// Alpha fits performed (binary-search steps over all budgets).
    pub fits: u64,
}

impl EvalCounts {
    /// Layer evaluations done, counting an attention half and an MLP half as half a layer each.
    pub fn layers(&self) -> f64 {
        (self.attention + self.mlp) as f64 / 2.0
    }
}

/// Calibration result.
#[derive(Debug, Clone)]
pub struct Calibration {
    /// Visual tokens per sample: the samples' mean, rounded (their counts may differ, e.g. NeXT
    /// images of different sizes); the recipes' N.
    pub visual_tokens: usize,
    /// Samples used.
    pub samples: usize,
    /// One entry per requested budget, in request order.
    pub budgets: Vec<FittedBudget>,
    /// Work counters.
    pub counts: EvalCounts,
}

/// Receives progress and answers whether to stop.
pub trait CalibrationObserver {
    /// `done` of `total` passes finished; `phase` says which.
    fn progress(&mut self, done: usize, total: usize, phase: &str);
    /// Checked between layers: `true` stops with [`PruneError::Cancelled`].
    fn cancelled(&self) -> bool {
        false
    }
}

/// An observer that ignores progress and never cancels.
pub struct Silent;

impl CalibrationObserver for Silent {
    fn progress(&mut self, _: usize, _: usize, _: &str) {}
}

/// One state of a sample's prefill: the input of some layer after some deletions.
struct Node {
    /// The layer this node enters.
    layer: usize,
    /// The layer input; computed when first needed (a fit that stops at this layer's budget
    /// check never needs it) and dropped under memory pressure (recomputed from the parent).
    x: Option<Tensor>,
    /// Parent node and the rows it kept, to compute `x` on demand.
    origin: Option<(usize, Vec<u32>)>,
    positions: Vec<u32>,
    is_visual: Vec<bool>,
    /// The layer's visual scores and cross-row count: all a pruning decision needs; kept.
    scores: Option<(VisualScores, usize)>,
    /// The layer's attention output before `o_proj`, needed to compute the children's `x`;
    /// dropped under memory pressure like `x`.
    attn: Option<Tensor>,
    /// Tick of the last use, for least-recently-used eviction.
    used: u64,
    /// Deleted current-row indices -> the node entering the next layer.
    children: HashMap<Vec<u32>, usize>,
}

/// One sample's states, root = the input of layer 0.
struct Sample {
    nodes: Vec<Node>,
    /// Unpruned statistics per layer: (W_cross, W_self).
    stats: Vec<(f64, f64)>,
}

struct Calibrator<'a> {
    model: &'a dyn LayerRunner,
    flops: FlopsModel,
    samples: Vec<Sample>,
    /// Each sample's own visual-token count.
    visual: Vec<u64>,
    counts: EvalCounts,
    /// Memo size limit and current size in bytes, and the use clock.
    cache_bytes: usize,
    held: usize,
    tick: u64,
}

fn bytes(t: &Tensor) -> usize {
    t.elem_count() * t.dtype().size_in_bytes()
}

/// Fits one recipe per budget from calibration prompts (each with visual tokens and some text
/// after the image). Samples may differ in visual-token count: each is walked with its own
/// count and FLOPs, and the budget is checked on the average over samples, as the authors'
/// statistics do; the result's N is the mean count, rounded. `model` runs the layer
/// evaluations.
pub fn calibrate(
    model: &dyn LayerRunner,
    prompts: &[PreparedPrompt],
    opts: &CalibrateOptions,
    observer: &mut dyn CalibrationObserver,
) -> Result<Calibration, PruneError> {
    validate(prompts, opts)?;
    let counts: Vec<u64> = prompts.iter().map(|p| p.visual_tokens() as u64).collect();
    let visual = ((counts.iter().sum::<u64>() + counts.len() as u64 / 2) / counts.len() as u64) as usize;
    let steps = search_steps(opts.tolerance);
    let total = 1 + opts.budgets.len() * steps;
    let mut c = Calibrator {
        model,
        flops: model.flops(),
        samples: Vec::with_capacity(prompts.len()),
        visual: counts,
        counts: EvalCounts::default(),
        cache_bytes: opts.cache_bytes,
        held: 0,
        tick: 0,
    };
    for (i, p) in prompts.iter().enumerate() {
        c.add_sample(p, observer)?;
        observer.progress(0, total, &format!("statistics: sample {} of {}", i + 1, prompts.len()));
    }
    let layers = c.flops.layers as u64;
    let mut done = 1;
    observer.progress(done, total, "statistics done");
    let mut budgets = Vec::new();
    for &budget in &opts.budgets {
        c.counts.naive_layers += layers * prompts.len() as u64;
        let (mut lo, mut hi) = (0.0f64, 1.0f64);
        let mut best: Option<(f64, Vec<usize>)> = None;
        while hi - lo > opts.tolerance + 1e-6 {
            let mid = (lo + hi) / 2.0;
            let (reached, scheme) = c.fit(mid, budget, observer)?;
            done += 1;
            observer.progress(done, total, &format!("budget {budget}: alpha {mid:.4}"));
            if reached {
                hi = mid;
                best = Some((mid, scheme));
            } else {
                lo = mid;
            }
        }
        if best.is_none() {
            let (reached, scheme) = c.fit(1.0, budget, observer)?;
            if reached {
                best = Some((1.0, scheme));
            }
        }
        let fitted = match best {
            Some((alpha, deletions)) => FittedBudget {
                budget,
                alpha: Some(alpha),
                achieved_reduction: c.flops.reduction(visual as u64, &deletions),
                deletions,
            },
            None => FittedBudget { budget, alpha: None, deletions: vec![0; c.flops.layers], achieved_reduction: 0.0 },
        };
        budgets.push(fitted);
    }
    observer.progress(total, total, "done");
    Ok(Calibration { visual_tokens: visual, samples: prompts.len(), budgets, counts: c.counts })
}

/// Binary-search steps the tolerance implies (7 for 0.01).
fn search_steps(tolerance: f64) -> usize {
    let mut w = 1.0;
    let mut n = 0;
    while w > tolerance + 1e-6 {
        w /= 2.0;
        n += 1;
    }
    n
}

fn validate(prompts: &[PreparedPrompt], opts: &CalibrateOptions) -> Result<(), PruneError> {
    let bad = |m: String| Err(PruneError::InvalidInput(m));
    if prompts.is_empty() {
        return bad("at least one sample is needed".into());
    }
    if opts.budgets.is_empty() {
        return bad("at least one budget is needed".into());
    }
    if let Some(b) = opts.budgets.iter().find(|b| !(**b > 0.0 && **b < 1.0)) {
        return bad(format!("budget {b} is outside (0, 1)"));
    }
    if !(opts.tolerance > 0.0 && opts.tolerance < 1.0) {
        return bad(format!("tolerance {} is outside (0, 1)", opts.tolerance));
    }
    for (i, p) in prompts.iter().enumerate() {
        if p.visual_tokens() == 0 {
            return bad(format!("sample {i} has no visual tokens"));
        }
        let last_visual = p.image_spans.iter().map(|r| r.end).max().unwrap_or(0);
        if last_visual >= p.input_ids.len() {
            return bad(format!("sample {i} has no text after its image, so cross attention is undefined"));
        }
    }
    Ok(())
}

impl Calibrator<'_> {
    /// Embeds a sample and walks its unpruned chain: the statistics pass.
    fn add_sample(&mut self, prompt: &PreparedPrompt, observer: &dyn CalibrationObserver) -> Result<(), PruneError> {
        let x = self.model.input_embeds(prompt)?;
        let mut is_visual = vec![false; prompt.input_ids.len()];
        for span in &prompt.image_spans {
            is_visual[span.clone()].iter_mut().for_each(|v| *v = true);
        }
        // The root's input is never evicted: every recomputation starts from it.
        let root = Node {
            layer: 0,
            x: Some(x),
            origin: None,
            positions: (0..prompt.input_ids.len() as u32).collect(),
            is_visual,
            scores: None,
            attn: None,
            used: 0,
            children: HashMap::new(),
        };
        self.samples.push(Sample { nodes: vec![root], stats: Vec::new() });
        let s = self.samples.len() - 1;
        let mut node = 0;
        for l in 0..self.flops.layers {
            if observer.cancelled() {
                return Err(PruneError::Cancelled);
            }
            let (scores, cross_rows) = self.ensure_scores(s, node)?;
            let w_cross = scores.cross_attn.iter().map(|&v| f64::from(v)).sum::<f64>() / cross_rows as f64;
            let w_self = scores.self_attn.iter().map(|&v| f64::from(v)).sum::<f64>();
            self.samples[s].stats.push((w_cross, w_self));
            if l + 1 < self.flops.layers {
                node = self.child(s, node, Vec::new())?;
            }
        }
        Ok(())
    }

    fn touch(&mut self, s: usize, node: usize) {
        self.tick += 1;
        self.samples[s].nodes[node].used = self.tick;
    }

    /// The node's visual scores, running its attention half if they were never computed.
    fn ensure_scores(&mut self, s: usize, node: usize) -> Result<(VisualScores, usize), PruneError> {
        if self.samples[s].nodes[node].scores.is_none() {
            self.ensure_attn(s, node)?;
        }
        self.touch(s, node);
        self.samples[s].nodes[node]
            .scores
            .clone()
            .ok_or_else(|| PruneError::InvalidInput("calibration lost a node's scores".into()))
    }

    /// The node's attention output (running its attention half, and its input first, if needed).
    fn ensure_attn(&mut self, s: usize, node: usize) -> Result<Tensor, PruneError> {
        self.touch(s, node);
        if let Some(a) = &self.samples[s].nodes[node].attn {
            return Ok(a.clone());
        }
        let x = self.ensure_input(s, node)?;
        self.compute_attn(s, node, &x)
    }

    /// Runs the node's attention half on its input `x`, keeping the output and the scores.
    fn compute_attn(&mut self, s: usize, node: usize, x: &Tensor) -> Result<Tensor, PruneError> {
        let n = &self.samples[s].nodes[node];
        let roles = n.scores.is_none().then(|| RowRoles::from_flags(&n.is_visual));
        let (attn, scores) = self.model.layer_attention(n.layer, x, &n.positions, roles.as_ref())?;
        self.counts.attention += 1;
        if let (Some(scores), Some(roles)) = (scores, roles) {
            self.samples[s].nodes[node].scores = Some((scores, roles.cross.len()));
        }
        self.store(s, node, None, Some(attn.clone()));
        Ok(attn)
    }

    /// The node's layer input, running the parent's MLP half (and whatever the parent lost) if
    /// it is not held. Each missing ancestor is recomputed once, so the cost is linear in depth.
    fn ensure_input(&mut self, s: usize, node: usize) -> Result<Tensor, PruneError> {
        self.touch(s, node);
        let n = &self.samples[s].nodes[node];
        if let Some(x) = &n.x {
            return Ok(x.clone());
        }
        let (parent, keep) =
            n.origin.clone().ok_or_else(|| PruneError::InvalidInput("calibration lost a root state".into()))?;
        let px = self.ensure_input(s, parent)?;
        let attn = match self.samples[s].nodes[parent].attn.clone() {
            Some(a) => a,
            None => self.compute_attn(s, parent, &px)?,
        };
        let layer = self.samples[s].nodes[parent].layer;
        let pruned = keep.len() < px.dim(1)?;
        let x = self.model.layer_finish(layer, &px, &attn, pruned.then_some(keep.as_slice()))?;
        self.counts.mlp += 1;
        self.store(s, node, Some(x.clone()), None);
        Ok(x)
    }

    /// Keeps a computed tensor in the memo, then evicts the least recently used tensors (never a
    /// root input) down to three quarters of the limit if it is exceeded.
    fn store(&mut self, s: usize, node: usize, x: Option<Tensor>, attn: Option<Tensor>) {
        let n = &mut self.samples[s].nodes[node];
        if let Some(x) = x {
            self.held += bytes(&x);
            n.x = Some(x);
        }
        if let Some(a) = attn {
            self.held += bytes(&a);
            n.attn = Some(a);
        }
        if self.held <= self.cache_bytes {
            return;
        }
        let mut held: Vec<(u64, usize, usize)> = Vec::new();
        for (si, sample) in self.samples.iter().enumerate() {
            for (ni, n) in sample.nodes.iter().enumerate() {
                if (n.x.is_some() && n.origin.is_some()) || n.attn.is_some() {
                    held.push((n.used, si, ni));
                }
            }
        }
        held.sort_unstable();
        let goal = self.cache_bytes / 4 * 3;
        for (_, si, ni) in held {
            if self.held <= goal {
                break;
            }
            let n = &mut self.samples[si].nodes[ni];
            if n.origin.is_some() {
                self.held -= n.x.take().as_ref().map_or(0, bytes);
            }
            self.held -= n.attn.take().as_ref().map_or(0, bytes);
        }
    }

    /// The node entering layer + 1 after deleting `deleted` (current-row indices) at `layer`;
    /// its hidden state is computed only when something needs it.
    fn child(&mut self, s: usize, node: usize, deleted: Vec<u32>) -> Result<usize, PruneError> {
        if let Some(&c) = self.samples[s].nodes[node].children.get(&deleted) {
            return Ok(c);
        }
        let n = &self.samples[s].nodes[node];
        let keep: Vec<u32> = (0..n.positions.len() as u32).filter(|i| deleted.binary_search(i).is_err()).collect();
        let child = Node {
            layer: n.layer + 1,
            x: None,
            positions: keep.iter().map(|&i| n.positions[i as usize]).collect(),
            is_visual: keep.iter().map(|&i| n.is_visual[i as usize]).collect(),
            origin: Some((node, keep)),
            scores: None,
            attn: None,
            used: 0,
            children: HashMap::new(),
        };
        let nodes = &mut self.samples[s].nodes;
        nodes.push(child);
        let id = nodes.len() - 1;
        nodes[node].children.insert(deleted, id);
        Ok(id)
    }

    /// One alpha of the search for one budget: walks the layers over all samples exactly as the
    /// authors' `fit_model`, returning whether the budget was reached and the floor-averaged scheme.
    fn fit(
        &mut self,
        alpha: f64,
        budget: f64,
        observer: &dyn CalibrationObserver,
    ) -> Result<(bool, Vec<usize>), PruneError> {
        self.counts.fits += 1;
        let layers = self.flops.layers;
        let count = self.samples.len();
        let origin = self.mean_unpruned();
        let mut left = self.visual.clone();
        let mut at = vec![0usize; count];
        let mut scheme = vec![0usize; layers];
        let mut already: u128 = 0;
        let mut reached = false;
        for (l, entry) in scheme.iter_mut().enumerate() {
            let mut forecast: u128 = 0;
            for &n in &left {
                already += self.flops.qkv(n) + self.flops.attn(n);
                forecast += self.flops.rest(n) + (layers - 1 - l) as u128 * self.flops.layer(n);
            }
            let target = origin * (1.0 - budget);
            if (already + forecast) as f64 / count as f64 <= target {
                reached = true;
                self.counts.naive_layers += (l * count) as u64;
                break;
            }
            // Every later check adds non-negative costs to `already`, so once it alone is over
            // the target no later layer can reach it: the authors' walk would run every
            // remaining layer to learn the same "not reached".
            if already as f64 / count as f64 > target {
                break;
            }
            for s in 0..count {
                if observer.cancelled() {
                    return Err(PruneError::Cancelled);
                }
                let deleted = self.decide(s, at[s], l, alpha)?;
                *entry += deleted.len();
                left[s] -= deleted.len() as u64;
                already += self.flops.rest(left[s]);
                if l + 1 < layers {
                    at[s] = self.child(s, at[s], deleted)?;
                }
            }
        }
        if !reached {
            self.counts.naive_layers += (layers * count) as u64;
        }
        Ok((reached, scheme.into_iter().map(|d| d / count).collect()))
    }

    /// Unpruned FLOPs averaged over samples. With one shared count this is exactly
    /// `unpruned(N)` as the authors compute it (no averaging rounding at the budget boundary).
    fn mean_unpruned(&self) -> f64 {
        match self.visual.first() {
            Some(&n) if self.visual.iter().all(|&m| m == n) => self.flops.unpruned(n) as f64,
            _ => {
                let total: u128 = self.visual.iter().map(|&n| self.flops.unpruned(n)).sum();
                total as f64 / self.visual.len() as f64
            }
        }
    }

    /// Rows to delete at a node for `alpha`: the intersection of the cross and self prefix sets.
    fn decide(&mut self, s: usize, node: usize, layer: usize, alpha: f64) -> Result<Vec<u32>, PruneError> {
        let (scores, cross_rows) = self.ensure_scores(s, node)?;
        let sample = &self.samples[s];
        let n = &sample.nodes[node];
        let (w_cross, w_self) = sample.stats[layer];
        let cross: Vec<f32> = scores.cross_attn.iter().map(|&v| v / cross_rows as f32).collect();
        let by_cross = prefix_deletions(&cross, w_cross, alpha);
        let by_self = prefix_deletions(&scores.self_attn, w_self, alpha);
        let mut in_cross = vec![false; cross.len()];
        by_cross.iter().for_each(|&j| in_cross[j] = true);
        let visual_rows: Vec<u32> = n.is_visual.iter().enumerate().filter(|(_, &v)| v).map(|(i, _)| i as u32).collect();
        let mut rows: Vec<u32> = by_self.into_iter().filter(|&j| in_cross[j]).map(|j| visual_rows[j]).collect();
        rows.sort_unstable();
        Ok(rows)
    }
}

#[cfg(test)]
mod tests {
    use super::search_steps;

    #[test]
    fn tolerance_sets_the_number_of_search_steps() {
        assert_eq!(search_steps(0.01), 7);
        assert_eq!(search_steps(0.1), 4);
        assert_eq!(search_steps(0.5), 1);
    }
}
