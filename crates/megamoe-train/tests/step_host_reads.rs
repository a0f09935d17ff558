//! A training step reads the device at most twice, whatever the number of layers,
//! experts and micro-batches: once for the loss parts and statistics of every
//! micro-batch and layer (accumulated on the device, read in one batch) and once
//! for the gradient norm of clipping. Checked in static-capacity mode, where the
//! MoE layer itself makes no host read. One test in its own binary: the host-read
//! counter is process-wide, and parallel tests would share it.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use megamoe_plan::RawConfig;
use megamoe_train::{DataSource, Tokenizer, Trainer, TrainerOptions};

const TINY: &str = include_str!("../../../configs/tiny.toml");

/// `host_reads` of each of three steps of configs/tiny.toml with `sets` applied.
fn step_reads(sets: &[&str]) -> Vec<u64> {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    let raw = RawConfig::from_toml_str_with_overrides(TINY, &sets).unwrap();
    let data = Arc::new(DataSource::synthetic(Tokenizer::bytes()));
    let mut t = Trainer::new(
        &raw,
        data,
        TrainerOptions {
            peak_flops: None,
            ..Default::default()
        },
    )
    .unwrap();
    (0..3)
        .map(|_| {
            let before = megamoe_tensor::host_reads();
            let m = t.step().unwrap();
            let reads = megamoe_tensor::host_reads() - before;
            assert_eq!(m.host_reads, reads, "metrics report the counter");
            assert!(!m.skipped && m.loss.total.is_finite());
            reads
        })
        .collect()
}

#[test]
fn static_capacity_step_makes_at_most_two_host_reads() {
    let static_capacity = [
        "moe.capacity_factor=1.25",
        "moe.pad_to_capacity=true",
        "parallel.microbatches=4",
    ];
    let variants: [&[&str]; 4] = [
        &[],
        &[
            "model.n_layers=8",
            "moe.routed_experts=16",
            "parallel.microbatches=8",
        ],
        &["moe.shared_expert_gate=true", "moe.expert_bias=true"],
        &[
            "parallel.microbatches=2",
            "model.n_layers=6",
            "moe.routed_experts=4",
        ],
    ];
    for extra in variants {
        let sets: Vec<&str> = static_capacity.iter().chain(extra).copied().collect();
        let reads = step_reads(&sets);
        assert!(
            reads.iter().all(|&r| r <= 2),
            "host reads per step {reads:?} with {sets:?}"
        );
    }
}
