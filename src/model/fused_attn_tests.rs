use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::super::visibility::position_mask;
use super::*;

/// The position mask as a row-major vector, all zeros where it is `None` (nothing hidden).
fn position_values(rows: &[u32], keys: &[u32], window: Option<u32>) -> Vec<f32> {
    match position_mask(rows, keys, window, &Device::Cpu).unwrap() {
        Some(m) => m.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        None => vec![0.0; rows.len() * keys.len()],
    }
}

/// Every shape `fused_mask` claims is the position mask, value for value, over prefills, pruned
/// prefills (holes), cache tails and decode rows, with and without sliding windows.
#[test]
fn every_fused_shape_is_exactly_the_position_mask() {
    let mut rng = ChaCha8Rng::seed_from_u64(14);
    let (mut full, mut causal, mut windowed, mut eager) = (0, 0, 0, 0);
    for _ in 0..3000 {
        let start = rng.random_range(0..50u32);
        let n = rng.random_range(1..40usize);
        let mut keys: Vec<u32> = (start..start + n as u32).collect();
        if rng.random_bool(0.5) {
            // Pruned rows leave holes; the first stays, as FitPrune keeps the system prompt.
            let mut kept = vec![keys[0]];
            kept.extend(keys[1..].iter().copied().filter(|_| rng.random_bool(0.6)));
            keys = kept;
        }
        let tail = match rng.random_range(0..3) {
            0 => keys.len(),
            1 => 1,
            _ => rng.random_range(1..=keys.len()),
        };
        let rows = keys[keys.len() - tail..].to_vec();
        let window = rng.random_bool(0.5).then(|| rng.random_range(1..30u32));
        match fused_mask(&rows, &keys, window) {
            Some(shape) => {
                let want = position_values(&rows, &keys, window);
                let got = index_mask(shape, rows.len(), keys.len());
                assert_eq!(got, want, "{shape:?} for rows {rows:?}, keys {keys:?}, window {window:?}");
                match shape {
                    FusedMask::Full => full += 1,
                    FusedMask::Causal { window: None } => causal += 1,
                    FusedMask::Causal { window: Some(_) } => windowed += 1,
                }
            }
            None => eager += 1,
        }
    }
    // Each shape, and the fallback, is exercised many times.
    assert!(full > 100 && causal > 100 && windowed > 100 && eager > 50, "{full} {causal} {windowed} {eager}");
}

/// The cases the fused path exists for get a shape; the ones it cannot express get none, and
/// for those the nearest index shape is indeed wrong.
#[test]
fn prefill_pruned_prefill_and_decode_are_fused_holes_under_a_window_are_not() {
    let prefill: Vec<u32> = (0..10).collect();
    assert_eq!(fused_mask(&prefill, &prefill, None), Some(FusedMask::Causal { window: None }));
    let pruned = [0, 1, 2, 5, 7, 9];
    assert_eq!(fused_mask(&pruned, &pruned, None), Some(FusedMask::Causal { window: None }));
    assert_eq!(fused_mask(&[9], &prefill, None), Some(FusedMask::Full));
    assert_eq!(fused_mask(&[9], &prefill, Some(4)), Some(FusedMask::Causal { window: Some(4) }));
    assert_eq!(fused_mask(&prefill, &prefill, Some(4)), Some(FusedMask::Causal { window: Some(4) }));
    // A window wider than the prompt hides nothing.
    assert_eq!(fused_mask(&pruned, &pruned, Some(64)), Some(FusedMask::Causal { window: None }));

    // Holes under a window that bites: by position row 9 sees 7 and 9, by index it would see 5.
    assert_eq!(fused_mask(&pruned, &pruned, Some(3)), None);
    let by_index = index_mask(FusedMask::Causal { window: Some(3) }, pruned.len(), pruned.len());
    assert_ne!(by_index, position_values(&pruned, &pruned, Some(3)));
    // Rows that are not the keys' tail, and keys out of order.
    assert_eq!(fused_mask(&[3, 4], &prefill, None), None);
    assert_eq!(fused_mask(&[1, 2], &[2, 1, 0], None), None);
    assert_eq!(fused_mask(&[], &prefill, None), None);
}

#[test]
fn cumulative_lengths_start_each_packed_sequence() {
    assert_eq!(cumulative_lengths(&[3, 1, 4]), vec![0, 3, 4, 8]);
    assert_eq!(cumulative_lengths(&[]), vec![0]);
}

/// Off CUDA (or in f32) nothing is fused and the caller's eager path runs.
#[test]
fn nothing_is_fused_on_the_cpu() {
    let q = Tensor::zeros((1, 2, 3, 8), DType::F32, &Device::Cpu).unwrap();
    assert!(!applies(&q));
    assert!(attend(&q, &q, &q, FusedMask::Full, 1.0).unwrap().is_none());
    let h = q.to_dtype(DType::BF16).unwrap();
    assert!(!applies(&h));
    let starts = Tensor::new(cumulative_lengths(&[3]).as_slice(), &Device::Cpu).unwrap();
    assert!(attend_packed(&h, &h, &h, &starts, 3, FusedMask::Full, 1.0).unwrap().is_none());
}
