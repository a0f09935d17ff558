//! `memory_bytes` in each step record is the measured peak of live tensor bytes,
//! split into the state held before the step and what the step added, so
//! recompute and micro-batching show up. One test in its own binary: the
//! live-bytes counter is process-wide, and parallel tests would share it.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use megamoe_plan::RawConfig;
use megamoe_train::{DataSource, StepMetrics, Tokenizer, Trainer, TrainerOptions};

const CONFIG: &str = r#"
[model]
vocab_size = 256
d_model = 32
n_layers = 4
n_heads = 2
ffn_hidden = 64
seq_len = 32

[moe]
routed_experts = 4
top_k = 2
expert_hidden = 32
first_dense_layers = 1

[train]
global_batch = 8
steps = 4

[optim]
warmup_steps = 2
"#;

/// The second step's metrics (the first also allocates the optimizer moments).
fn second_step(sets: &[&str]) -> StepMetrics {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    let raw = RawConfig::from_toml_str_with_overrides(CONFIG, &sets).unwrap();
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
    t.step().unwrap();
    t.step().unwrap()
}

#[test]
fn step_memory_is_measured_and_shows_recompute_and_micro_batches() {
    let plain = second_step(&[]);
    let full = second_step(&["train.recompute=\"full\""]);
    let micro = second_step(&["parallel.microbatches=4"]);
    for m in [&plain, &full, &micro] {
        let (state, act) = (m.state_bytes, m.activation_bytes);
        assert_eq!(m.memory_bytes, Some(state + act));
        assert!(state > 0 && act > 0, "{state} {act}");
    }
    // The same model and optimizer hold the same state whatever the schedule.
    assert_eq!(plain.state_bytes, full.state_bytes);
    assert_eq!(plain.state_bytes, micro.state_bytes);
    // Keeping only block inputs, or a quarter of the batch at a time, lowers the peak.
    let act = |m: &StepMetrics| m.activation_bytes;
    assert!(
        act(&full) < act(&plain),
        "full {} none {}",
        act(&full),
        act(&plain)
    );
    assert!(
        act(&micro) < act(&plain),
        "micro {} one {}",
        act(&micro),
        act(&plain)
    );
    // And the losses are the ones of the plain run (recompute changes no number).
    assert_eq!(full.loss.total.to_bits(), plain.loss.total.to_bits());
}
