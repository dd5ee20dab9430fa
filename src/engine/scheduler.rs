//! The engine's scheduler: which waiting sequences start (prefill) and which running ones
//! advance (decode) in each engine step, and the KV-cache memory they hold. It knows no model
//! and no tensors — sequences are ids with a [`Demand`] — so its policy is unit-tested alone
//! (the shape of TGI's `State::next_batch` and vLLM's scheduler).
//!
//! Policy: every running sequence decodes one token per step (fair, whatever its length).
//! Waiting sequences are admitted first come, first served while the running count stays under
//! `max_running`, the step's prefill tokens (summed, as batches are packed) stay within
//! `max_batch_prefill_tokens` (one is always allowed) and the KV memory admitted stays within
//! the capacity. A head that does not fit waits, and nothing behind it overtakes it, so a large
//! request is delayed by memory but never starved. A sequence admitted in a step is prefilled in
//! that step and decodes from the next one on; its memory is freed when it finishes.

use std::collections::VecDeque;

/// A sequence's id, unique within one engine.
pub type SeqId = u64;

/// What a sequence needs to start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Demand {
    /// Rows its prefill packs into the batch.
    pub prompt_tokens: usize,
    /// KV-cache bytes it holds from prefill until it finishes (see `engine::kv`).
    pub kv_bytes: u64,
}

/// The scheduler's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerLimits {
    /// Most sequences running at once.
    pub max_running: usize,
    /// Most prompt tokens prefilled in one step (the first admission ignores it).
    pub max_batch_prefill_tokens: usize,
    /// KV-cache bytes all running sequences may hold together.
    pub kv_capacity_bytes: u64,
}

/// What one engine step runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepPlan {
    /// Sequences to prefill this step (one batched pass), in admission order.
    pub prefill: Vec<SeqId>,
    /// Running sequences to advance by one token (one batched decode pass).
    pub decode: Vec<SeqId>,
}

impl StepPlan {
    /// Whether the step runs no chat work.
    pub fn is_empty(&self) -> bool {
        self.prefill.is_empty() && self.decode.is_empty()
    }
}

/// A sequence the scheduler cannot take.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    /// It needs more KV memory than the whole cache has, so it could never start.
    #[error(
        "the request needs {needed} bytes of KV cache but the server's whole cache is {capacity} bytes; \
         send a shorter prompt, fewer images or a smaller max_tokens"
    )]
    TooLarge {
        /// Bytes it needs.
        needed: u64,
        /// Bytes there are.
        capacity: u64,
    },
    /// The id is already known.
    #[error("sequence {0} is already scheduled")]
    Duplicate(SeqId),
}

/// Waiting and running sequences and the memory they hold.
#[derive(Debug)]
pub struct Scheduler {
    limits: SchedulerLimits,
    waiting: VecDeque<(SeqId, Demand)>,
    /// In admission order, with the bytes each holds.
    running: Vec<(SeqId, u64)>,
    kv_used: u64,
}

impl Scheduler {
    /// An empty scheduler.
    pub fn new(limits: SchedulerLimits) -> Self {
        Self { limits, waiting: VecDeque::new(), running: Vec::new(), kv_used: 0 }
    }

    /// Queues a sequence behind those already waiting.
    pub fn enqueue(&mut self, id: SeqId, demand: Demand) -> Result<(), ScheduleError> {
        if demand.kv_bytes > self.limits.kv_capacity_bytes {
            return Err(ScheduleError::TooLarge { needed: demand.kv_bytes, capacity: self.limits.kv_capacity_bytes });
        }
        if self.contains(id) {
            return Err(ScheduleError::Duplicate(id));
        }
        self.waiting.push_back((id, demand));
        Ok(())
    }

    /// Decides the next step: every running sequence decodes, then waiting ones are admitted
    /// (and charged their memory) as the limits allow.
    pub fn schedule(&mut self) -> StepPlan {
        let decode: Vec<SeqId> = self.running.iter().map(|&(id, _)| id).collect();
        let mut prefill = Vec::new();
        let mut tokens = 0usize;
        while let Some(&(id, demand)) = self.waiting.front() {
            let over_tokens = tokens.saturating_add(demand.prompt_tokens) > self.limits.max_batch_prefill_tokens;
            if self.running.len() >= self.limits.max_running
                || (!prefill.is_empty() && over_tokens)
                || self.kv_used + demand.kv_bytes > self.limits.kv_capacity_bytes
            {
                break;
            }
            self.waiting.pop_front();
            self.kv_used += demand.kv_bytes;
            self.running.push((id, demand.kv_bytes));
            prefill.push(id);
            tokens = tokens.saturating_add(demand.prompt_tokens);
        }
        StepPlan { prefill, decode }
    }

    /// Removes a sequence, waiting or running (finished, failed or cancelled), freeing its
    /// memory. `false` if it was unknown.
    pub fn remove(&mut self, id: SeqId) -> bool {
        if let Some(i) = self.running.iter().position(|&(r, _)| r == id) {
            let (_, bytes) = self.running.remove(i);
            self.kv_used -= bytes;
            return true;
        }
        if let Some(i) = self.waiting.iter().position(|&(w, _)| w == id) {
            self.waiting.remove(i);
            return true;
        }
        false
    }

    /// Whether `id` is waiting or running.
    pub fn contains(&self, id: SeqId) -> bool {
        self.running.iter().any(|&(r, _)| r == id) || self.waiting.iter().any(|&(w, _)| w == id)
    }

    /// Waiting sequences, first come first.
    pub fn waiting(&self) -> impl Iterator<Item = SeqId> + '_ {
        self.waiting.iter().map(|&(id, _)| id)
    }

    /// Running sequences, in admission order.
    pub fn running(&self) -> impl Iterator<Item = SeqId> + '_ {
        self.running.iter().map(|&(id, _)| id)
    }

    /// Number of waiting sequences.
    pub fn waiting_len(&self) -> usize {
        self.waiting.len()
    }

    /// Number of running sequences.
    pub fn running_len(&self) -> usize {
        self.running.len()
    }

    /// Whether nothing waits or runs.
    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    /// KV bytes the running sequences hold.
    pub fn kv_used(&self) -> u64 {
        self.kv_used
    }

    /// KV bytes there are.
    pub fn kv_capacity(&self) -> u64 {
        self.limits.kv_capacity_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_running: usize, tokens: usize, kv: u64) -> SchedulerLimits {
        SchedulerLimits { max_running, max_batch_prefill_tokens: tokens, kv_capacity_bytes: kv }
    }

    fn demand(prompt_tokens: usize, kv_bytes: u64) -> Demand {
        Demand { prompt_tokens, kv_bytes }
    }

    #[test]
    fn admitted_sequences_prefill_once_then_decode_every_step() {
        let mut s = Scheduler::new(limits(8, 1000, 1000));
        s.enqueue(1, demand(10, 10)).unwrap();
        assert_eq!(s.schedule(), StepPlan { prefill: vec![1], decode: vec![] });
        s.enqueue(2, demand(10, 10)).unwrap();
        assert_eq!(s.schedule(), StepPlan { prefill: vec![2], decode: vec![1] });
        assert_eq!(s.schedule(), StepPlan { prefill: vec![], decode: vec![1, 2] });
        assert!(s.remove(1));
        assert_eq!(s.schedule(), StepPlan { prefill: vec![], decode: vec![2] });
        assert!(s.remove(2));
        assert!(s.is_idle() && s.schedule().is_empty());
    }

    #[test]
    fn max_running_caps_admission_and_a_finish_frees_a_slot() {
        let mut s = Scheduler::new(limits(2, 1000, 1000));
        for id in 1..=3 {
            s.enqueue(id, demand(5, 1)).unwrap();
        }
        assert_eq!(s.schedule().prefill, vec![1, 2]);
        assert_eq!(s.schedule().prefill, Vec::<SeqId>::new());
        assert_eq!(s.waiting_len(), 1);
        s.remove(1);
        assert_eq!(s.schedule(), StepPlan { prefill: vec![3], decode: vec![2] });
    }

    #[test]
    fn the_prefill_token_budget_splits_batches_but_always_admits_one() {
        let mut s = Scheduler::new(limits(8, 100, 10_000));
        s.enqueue(1, demand(60, 1)).unwrap();
        s.enqueue(2, demand(40, 1)).unwrap();
        s.enqueue(3, demand(1, 1)).unwrap();
        s.enqueue(4, demand(500, 1)).unwrap();
        // 60 + 40 = 100 fits exactly; 3 would exceed it.
        assert_eq!(s.schedule().prefill, vec![1, 2]);
        assert_eq!(s.schedule().prefill, vec![3]);
        // Larger than the whole budget: admitted alone rather than never.
        assert_eq!(s.schedule().prefill, vec![4]);
    }

    #[test]
    fn memory_short_means_waiting_in_order_not_failing() {
        let mut s = Scheduler::new(limits(8, 10_000, 100));
        s.enqueue(1, demand(1, 60)).unwrap();
        s.enqueue(2, demand(1, 50)).unwrap();
        s.enqueue(3, demand(1, 10)).unwrap();
        assert_eq!(s.schedule().prefill, vec![1]);
        assert_eq!(s.kv_used(), 60);
        // 3 would fit, but it does not overtake 2 (no starvation of larger requests).
        assert_eq!(s.schedule().prefill, Vec::<SeqId>::new());
        assert_eq!(s.waiting().collect::<Vec<_>>(), vec![2, 3]);
        s.remove(1);
        assert_eq!(s.kv_used(), 0);
        assert_eq!(s.schedule().prefill, vec![2, 3]);
        assert_eq!(s.kv_used(), 60);
    }

    #[test]
    fn a_sequence_larger_than_the_whole_cache_is_refused_at_once() {
        let mut s = Scheduler::new(limits(8, 10_000, 100));
        assert_eq!(s.enqueue(1, demand(1, 101)), Err(ScheduleError::TooLarge { needed: 101, capacity: 100 }));
        assert!(s.enqueue(2, demand(1, 100)).is_ok());
        assert_eq!(s.enqueue(2, demand(1, 1)), Err(ScheduleError::Duplicate(2)));
    }

    #[test]
    fn cancelling_a_waiting_sequence_frees_nothing_and_a_running_one_frees_its_bytes() {
        let mut s = Scheduler::new(limits(1, 10_000, 100));
        s.enqueue(1, demand(1, 70)).unwrap();
        s.enqueue(2, demand(1, 70)).unwrap();
        s.schedule();
        assert!(s.remove(2));
        assert_eq!((s.kv_used(), s.waiting_len(), s.running_len()), (70, 0, 1));
        assert!(s.remove(1));
        assert_eq!(s.kv_used(), 0);
        assert!(!s.remove(1));
    }

    #[test]
    fn pruned_sequences_cost_less_so_more_run_under_the_same_memory() {
        // Demands as engine::kv computes them: 32 layers, prompt 600 (576 visual), 64 tokens out;
        // the recipe deletes 288 visual tokens at layer 2 and 144 more at layer 8.
        let kv = crate::engine::kv::KvLayout::new(32, 32, 128, 2);
        let unpruned = kv.demand(600, 576, None, 63).bytes;
        let mut d = vec![0; 32];
        d[2] = 288;
        d[8] = 144;
        let pruned = kv.demand(600, 576, Some(&d), 63).bytes;
        let capacity = unpruned * 4;
        let admitted = |bytes: u64| {
            let mut s = Scheduler::new(limits(64, usize::MAX, capacity));
            for id in 0..64 {
                s.enqueue(id, demand(600, bytes)).unwrap();
            }
            s.schedule().prefill.len()
        };
        assert_eq!(admitted(unpruned), 4);
        assert!(admitted(pruned) >= 6, "{} pruned sequences fit", admitted(pruned));
    }
}
