//! KV-cache memory of a sequence, known at admission: per layer, the rows that layer's cache
//! keeps (the prompt minus what earlier layers pruned) plus the decode growth, times the bytes
//! one cached token costs in one layer. The decoder's caches allocate exactly this much
//! (`LayerCache` reserves its first append plus the growth), so the scheduler's accounting is
//! the memory the sequence holds.

/// The cache geometry of a decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    /// Decoder layers.
    pub layers: usize,
    /// Bytes one token costs in one layer: keys and values, kv_heads × head_dim × dtype size each.
    pub bytes_per_token: u64,
}

/// What one sequence will hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KvDemand {
    /// Bytes of all its caches.
    pub bytes: u64,
    /// Cache entries (tokens × layers) pruning spares it, against the same prompt unpruned.
    pub tokens_saved: u64,
}

impl KvLayout {
    /// The layout of a decoder with these shapes.
    pub fn new(layers: usize, kv_heads: usize, head_dim: usize, dtype_bytes: usize) -> Self {
        Self { layers, bytes_per_token: 2 * (kv_heads * head_dim * dtype_bytes) as u64 }
    }

    /// The memory a sequence of `prompt_tokens` (of which `visual` are visual) will hold when
    /// layer l deletes `deletions[l]` visual tokens (capped by what is left, as the pruning hook
    /// does; `None` = unpruned) and it may decode `growth` more tokens.
    pub fn demand(&self, prompt_tokens: usize, visual: usize, deletions: Option<&[usize]>, growth: usize) -> KvDemand {
        let mut left = visual;
        let mut tokens: u64 = 0;
        let mut saved: u64 = 0;
        for l in 0..self.layers {
            let gone = visual - left;
            tokens += (prompt_tokens - gone + growth) as u64;
            saved += gone as u64;
            left -= deletions.and_then(|d| d.get(l)).copied().unwrap_or(0).min(left);
        }
        KvDemand { bytes: tokens * self.bytes_per_token, tokens_saved: saved }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pruning_shortens_the_caches_after_a_pruning_layer_only() {
        // 4 layers, 1 byte-pair per token for readability: 2 * 1 * 1 * 1 = 2 bytes per token.
        let kv = KvLayout::new(4, 1, 1, 1);
        let unpruned = kv.demand(100, 60, None, 10);
        assert_eq!(unpruned, KvDemand { bytes: 4 * 110 * 2, tokens_saved: 0 });
        // Layer 1 deletes 20: layers 0 and 1 cache 110, layers 2 and 3 cache 90.
        let pruned = kv.demand(100, 60, Some(&[0, 20, 0, 0]), 10);
        assert_eq!(pruned, KvDemand { bytes: (110 + 110 + 90 + 90) * 2, tokens_saved: 40 });
        // Deletions past what is left are capped, as the hook caps them.
        let all = kv.demand(100, 60, Some(&[50, 50, 50, 0]), 0);
        assert_eq!(all.bytes, (100 + 50 + 40 + 40) * 2);
        assert_eq!(all.tokens_saved, 50 + 60 + 60);
    }
}
