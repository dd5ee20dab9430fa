//! Token choice on the logits' own device: a decode pass's (B, vocab) logits stay where the model
//! ran, and only what each response needs comes back.
//!
//! A greedy row needs its argmax, that token's log-probability and the `top_logprobs` best
//! alternatives: log-softmax, then k rounds of argmax-gather-mask, all on the device, so the
//! host receives B x k ids and log-probabilities in two copies instead of B x vocab floats
//! (k = 1 when no alternatives are asked for). Ties go to the lower id, as on the host
//! ([`super::sampling::argmax`], [`super::sampling::top_k`]).
//!
//! A sampling row (temperature > 0) comes back whole and is drawn on the host by its
//! [`super::sampling::Sampler`]: each request's seeded stream must give the same tokens whatever
//! batch it shares, and candle has no device sort wide enough for a vocabulary's nucleus.

use candle_core::{DType, Tensor, D};

use super::sampling::Choice;
use crate::model::ModelError;

/// What one row of a pass's logits must produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// The argmax with its log-probability and this many alternatives.
    Greedy {
        /// Alternatives to report (OpenAI `top_logprobs`).
        top_logprobs: usize,
    },
    /// The whole row, for the host sampler.
    Row,
}

/// What came back for one row.
#[derive(Debug, Clone, PartialEq)]
pub enum Picked {
    /// The greedy choice, made on the device.
    Chosen(Choice),
    /// The row's logits, copied to the host.
    Row(Vec<f32>),
}

/// Picks every row of `logits` (B, vocab) by its `needs[i]`, with one copy per kind of result.
pub fn pick_rows(logits: &Tensor, needs: &[Need]) -> Result<Vec<Picked>, ModelError> {
    let (rows, vocab) = logits.dims2()?;
    if rows != needs.len() {
        return Err(ModelError::InvalidInput(format!("{} needs for {rows} rows of logits", needs.len())));
    }
    let device = logits.device();
    let select = |which: &[u32]| -> Result<Tensor, ModelError> {
        if which.len() == rows {
            return Ok(logits.clone());
        }
        Ok(logits.index_select(&Tensor::new(which, device)?, 0)?)
    };
    let greedy: Vec<u32> = (0..rows as u32).filter(|&i| matches!(needs[i as usize], Need::Greedy { .. })).collect();
    let whole: Vec<u32> = (0..rows as u32).filter(|&i| needs[i as usize] == Need::Row).collect();
    let mut picked: Vec<Option<Picked>> = vec![None; rows];
    if !greedy.is_empty() {
        let k = greedy
            .iter()
            .map(|&i| match needs[i as usize] {
                Need::Greedy { top_logprobs } => top_logprobs,
                Need::Row => 0,
            })
            .max()
            .unwrap_or(0)
            .clamp(1, vocab);
        let (ids, logprobs) = top_k_on_device(&select(&greedy)?, k)?;
        for ((&row, ids), lps) in greedy.iter().zip(ids).zip(logprobs) {
            let Need::Greedy { top_logprobs } = needs[row as usize] else { continue };
            let top = ids.iter().copied().zip(lps.iter().copied()).take(top_logprobs).collect();
            picked[row as usize] = Some(Picked::Chosen(Choice { token: ids[0], logprob: lps[0], top }));
        }
    }
    if !whole.is_empty() {
        let host = select(&whole)?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        for (&row, values) in whole.iter().zip(host) {
            picked[row as usize] = Some(Picked::Row(values));
        }
    }
    picked
        .into_iter()
        .map(|p| p.ok_or_else(|| ModelError::InvalidInput("a row of logits was not picked".into())))
        .collect()
}

/// Per row: the k best ids and their log-probabilities.
type TopK = (Vec<Vec<u32>>, Vec<Vec<f32>>);

/// The k best (id, log-probability) pairs of every row, best first: log-softmax, then k rounds
/// of argmax, gather and masking the winner to -inf, on the logits' device.
fn top_k_on_device(logits: &Tensor, k: usize) -> Result<TopK, ModelError> {
    let rows = logits.dim(0)?;
    // Freshly computed, so masking it in place touches nothing else.
    let values = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?.contiguous()?;
    let masked = Tensor::full(f32::NEG_INFINITY, (rows, 1), logits.device())?;
    let (mut ids, mut lps) = (Vec::with_capacity(k), Vec::with_capacity(k));
    for round in 0..k {
        let id = values.argmax_keepdim(D::Minus1)?;
        lps.push(values.gather(&id, D::Minus1)?);
        if round + 1 < k {
            // In place: the next round's argmax skips this round's winners.
            values.scatter_set(&id, &masked, D::Minus1)?;
        }
        ids.push(id);
    }
    let ids = Tensor::cat(&ids, 1)?.to_vec2::<u32>()?;
    let lps = Tensor::cat(&lps, 1)?.to_vec2::<f32>()?;
    Ok((ids, lps))
}

#[cfg(test)]
mod tests {
    use candle_core::Device;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use crate::engine::sampling::{Sampler, SamplingParams};

    fn logits(rows: usize, vocab: usize, seed: u64) -> Vec<Vec<f32>> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..rows).map(|_| (0..vocab).map(|_| rng.random_range(-4.0f32..4.0)).collect()).collect()
    }

    #[test]
    fn device_greedy_matches_the_host_sampler() {
        let host = logits(5, 300, 3);
        let t = Tensor::new(host.clone(), &Device::Cpu).unwrap();
        let needs: Vec<Need> = [0, 3, 1, 0, 20].map(|k| Need::Greedy { top_logprobs: k }).to_vec();
        let picked = pick_rows(&t, &needs).unwrap();
        for ((row, need), got) in host.iter().zip(&needs).zip(picked) {
            let Need::Greedy { top_logprobs } = *need else { unreachable!() };
            let want = Sampler::new(SamplingParams { top_logprobs, ..Default::default() }).choose(row);
            let Picked::Chosen(got) = got else { panic!("greedy row came back whole") };
            assert_eq!(got.token, want.token);
            assert!((got.logprob - want.logprob).abs() < 1e-5, "{} vs {}", got.logprob, want.logprob);
            assert_eq!(got.top.len(), top_logprobs);
            for (g, w) in got.top.iter().zip(&want.top) {
                assert_eq!(g.0, w.0);
                assert!((g.1 - w.1).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn ties_go_to_the_lower_id_and_rows_needing_the_sampler_come_back_whole() {
        let host = vec![vec![1.0, 3.0, 3.0, 0.0, 3.0], vec![0.5, 0.1, 0.2, 0.3, 0.4]];
        let t = Tensor::new(host.clone(), &Device::Cpu).unwrap();
        let picked = pick_rows(&t, &[Need::Greedy { top_logprobs: 3 }, Need::Row]).unwrap();
        let Picked::Chosen(c) = &picked[0] else { panic!("expected a choice") };
        assert_eq!(c.token, 1);
        assert_eq!(c.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 2, 4]);
        assert_eq!(picked[1], Picked::Row(host[1].clone()));
        assert!(pick_rows(&t, &[Need::Row]).is_err());
    }
}
