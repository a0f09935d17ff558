//! Expert load by data domain and the shared-expert gate in the step metrics: the
//! per-(domain, expert) counts sum to the kept assignments and follow the batch's
//! domains; the gate mean matches σ(0) = 1/2 for a zero gate weight.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use megamoe_plan::RawConfig;
use megamoe_tensor::{Device, Tensor};
use megamoe_train::{BatchConfig, Batcher, DataSource, Tokenizer, Trainer, TrainerOptions};

/// 2 layers (layer 1 MoE, 4 experts top-2, shared expert with a gate), two
/// micro-batches of 4 sequences each.
const MICRO: &str = r#"
[model]
vocab_size = 256
d_model = 32
n_layers = 2
n_heads = 2
n_kv_heads = 1
ffn_hidden = 64
seq_len = 32
tie_embeddings = true

[moe]
routed_experts = 4
top_k = 2
expert_hidden = 32
shared_experts = 1
shared_expert_hidden = 16
shared_expert_gate = true
first_dense_layers = 1

[parallel]
microbatches = 2

[train]
global_batch = 8
steps = 20
seed = 11

[optim]
name = "adamw"
lr = 1e-2
"#;

fn trainer(overrides: &[&str]) -> Trainer {
    let sets: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    let raw = RawConfig::from_toml_str_with_overrides(MICRO, &sets).unwrap();
    let data = Arc::new(DataSource::synthetic(Tokenizer::bytes()));
    Trainer::new(&raw, data, TrainerOptions::default()).unwrap()
}

/// Sequences per domain in the trainer's first batch, read by a second batcher with
/// the same seed (the data order is a pure function of seed and position).
fn first_batch_domain_sequences(t: &Trainer) -> Vec<u64> {
    let mut b = Batcher::new(
        t.data().clone(),
        BatchConfig {
            batch_size: 8,
            seq_len: 32,
            seed: 11,
        },
    )
    .unwrap();
    let batch = b.next_batch().unwrap();
    let mut per = vec![0u64; t.data().domain_names().len()];
    for d in &batch.domains {
        per[d.0 as usize] += 1;
    }
    per
}

#[test]
fn dropless_domain_counts_are_k_slots_per_token_of_each_domain() {
    let mut t = trainer(&[]);
    let per_domain = first_batch_domain_sequences(&t);
    assert!(
        per_domain.iter().filter(|&&n| n > 0).count() > 1,
        "{per_domain:?}"
    );
    let m = t.step().unwrap();
    assert_eq!(m.moe.len(), 1);
    let l = &m.moe[0];
    assert_eq!(l.layer, 1);
    assert_eq!(l.tokens_per_expert_by_domain.len(), per_domain.len());
    // Dropless, no null slots: every token of domain d puts K = 2 assignments on
    // experts, so row d sums to 2 · 32 tokens · (sequences of domain d).
    for (row, &seqs) in l.tokens_per_expert_by_domain.iter().zip(&per_domain) {
        assert_eq!(row.len(), 4);
        assert_eq!(row.iter().sum::<u64>(), 2 * 32 * seqs);
    }
    // Column e sums to expert e's kept (= picked, dropless) assignments.
    for e in 0..4 {
        let col: u64 = l.tokens_per_expert_by_domain.iter().map(|r| r[e]).sum();
        assert_eq!(col, l.tokens_per_expert[e], "expert {e}");
    }
}

#[test]
fn with_capacity_drops_domain_counts_sum_to_kept_assignments() {
    let mut t = trainer(&["moe.capacity_factor=0.5"]);
    let m = t.step().unwrap();
    let l = &m.moe[0];
    assert!(l.dropped > 0, "capacity 0.5 must drop");
    let kept: u64 = l.tokens_per_expert.iter().sum::<u64>() - l.dropped;
    let counted: u64 = l.tokens_per_expert_by_domain.iter().flatten().sum();
    assert_eq!(counted, kept);
    // C = ceil(32·4 tokens · 2 / 4 experts · 0.5) = 32 per expert per micro-batch.
    for e in 0..4 {
        let col: u64 = l.tokens_per_expert_by_domain.iter().map(|r| r[e]).sum();
        assert!(col <= 2 * 32, "expert {e} kept {col} > 2 micro-batches · C");
    }
}

#[test]
fn shared_gate_mean_is_one_half_for_a_zero_gate_and_absent_without_gate() {
    let mut t = trainer(&[]);
    for (_, moe) in t.params_mut().moe_layers_mut() {
        let g = moe.shared_experts.as_mut().unwrap().gate.as_mut().unwrap();
        *g = Tensor::zeros([1, 32], megamoe_tensor::DType::F32, Device::Cpu).unwrap();
    }
    let m = t.step().unwrap();
    // σ(x · 0) = 1/2 for every token, whatever x is.
    assert_eq!(m.moe[0].shared_gate_mean, Some(0.5));
    let m = t.step().unwrap();
    let g = m.moe[0].shared_gate_mean.unwrap();
    assert!(g > 0.0 && g < 1.0 && g != 0.5, "{g}");

    let mut t = trainer(&["moe.shared_expert_gate=false"]);
    assert_eq!(t.step().unwrap().moe[0].shared_gate_mean, None);
}
