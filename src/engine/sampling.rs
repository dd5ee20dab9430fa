//! Token selection from logits: greedy or temperature + nucleus (top-p) sampling with a seeded
//! RNG, plus the log-probabilities OpenAI clients ask for.
//!
//! Reported log-probabilities are those of the model's raw distribution (log-softmax of the
//! logits, before temperature and top-p), as vLLM reports them by default.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::device_pick::{Need, Picked};

/// How to pick tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Nucleus mass in (0, 1]; 1 disables it.
    pub top_p: f32,
    /// Seed for reproducible sampling; `None` draws one from the OS.
    pub seed: Option<u64>,
    /// How many alternatives to report per step (0 = none).
    pub top_logprobs: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self { temperature: 0.0, top_p: 1.0, seed: None, top_logprobs: 0 }
    }
}

/// One chosen token with its log-probability and the top alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    /// The token id.
    pub token: u32,
    /// Its log-probability under the model.
    pub logprob: f32,
    /// The `top_logprobs` most likely tokens, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// Picks tokens for one sequence.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
}

impl Sampler {
    /// A sampler; the same seed and logits always give the same tokens.
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(s) => ChaCha8Rng::seed_from_u64(s),
            None => ChaCha8Rng::from_os_rng(),
        };
        Self { params, rng }
    }

    /// What this sampler needs from a pass's logits: greedy choices are made on the device.
    pub fn need(&self) -> Need {
        if self.params.temperature <= 0.0 {
            Need::Greedy { top_logprobs: self.params.top_logprobs }
        } else {
            Need::Row
        }
    }

    /// The next token from what [`super::device_pick::pick_rows`] returned for this sampler's
    /// [`Self::need`].
    pub fn take(&mut self, picked: Picked) -> Choice {
        match picked {
            Picked::Chosen(choice) => choice,
            Picked::Row(logits) => self.choose(&logits),
        }
    }

    /// Chooses the next token from (vocab,) logits.
    pub fn choose(&mut self, logits: &[f32]) -> Choice {
        let logprobs = log_softmax(logits);
        let token = if self.params.temperature <= 0.0 { argmax(logits) } else { self.sample(logits) };
        let top = top_k(&logprobs, self.params.top_logprobs);
        Choice { token, logprob: logprobs[token as usize], top }
    }

    fn sample(&mut self, logits: &[f32]) -> u32 {
        let t = self.params.temperature;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<(u32, f32)> =
            logits.iter().enumerate().map(|(i, &l)| (i as u32, ((l - max) / t).exp())).collect();
        // Descending probability, ties by id, so the nucleus is deterministic.
        probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let total: f32 = probs.iter().map(|p| p.1).sum();
        let mut kept = 0;
        let mut mass = 0.0;
        for p in &probs {
            kept += 1;
            mass += p.1 / total;
            if mass >= self.params.top_p {
                break;
            }
        }
        let nucleus = &probs[..kept];
        let nucleus_total: f32 = nucleus.iter().map(|p| p.1).sum();
        let mut r = self.rng.random::<f32>() * nucleus_total;
        for &(id, p) in nucleus {
            if r < p {
                return id;
            }
            r -= p;
        }
        nucleus[kept - 1].0
    }
}

/// Index of the largest value (the first one on ties, like torch.argmax).
pub fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best as u32
}

/// Numerically stable log-softmax.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = logits.iter().map(|&l| (l - max).exp()).sum();
    let lse = max + sum.ln();
    logits.iter().map(|&l| l - lse).collect()
}

/// The k largest entries, largest first (ties by lower id).
pub fn top_k(values: &[f32], k: usize) -> Vec<(u32, f32)> {
    if k == 0 {
        return Vec::new();
    }
    let mut idx: Vec<(u32, f32)> = values.iter().enumerate().map(|(i, &v)| (i as u32, v)).collect();
    let k = k.min(idx.len());
    idx.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    idx.truncate(k);
    idx.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_argmax_and_reports_logprobs() {
        let mut s = Sampler::new(SamplingParams { top_logprobs: 2, ..Default::default() });
        let c = s.choose(&[0.0, 2.0, 1.0]);
        assert_eq!(c.token, 1);
        let expect = 2.0 - (1.0f32 + 2.0f32.exp() + 1.0f32.exp()).ln();
        assert!((c.logprob - expect).abs() < 1e-6);
        assert_eq!(c.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 2]);
    }

    #[test]
    fn same_seed_same_tokens_different_seed_differs() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 7) % 13) as f32 * 0.3).collect();
        let run = |seed| {
            let mut s = Sampler::new(SamplingParams { temperature: 1.0, seed: Some(seed), ..Default::default() });
            (0..40).map(|_| s.choose(&logits).token).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn top_p_restricts_to_the_nucleus() {
        // Token 0 holds ~88% of the mass: top_p 0.5 must always pick it.
        let logits = [4.0, 1.0, 1.0, 0.5];
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, top_p: 0.5, seed: Some(1), ..Default::default() });
        assert!((0..200).all(|_| s.choose(&logits).token == 0));
        // With top_p 1 the others do show up.
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, top_p: 1.0, seed: Some(1), ..Default::default() });
        assert!((0..200).any(|_| s.choose(&logits).token != 0));
    }

    #[test]
    fn top_k_orders_and_truncates() {
        assert_eq!(top_k(&[0.1, 0.5, 0.3, 0.5], 3), vec![(1, 0.5), (3, 0.5), (2, 0.3)]);
        assert!(top_k(&[1.0], 0).is_empty());
        assert_eq!(top_k(&[1.0], 5).len(), 1);
    }
}
