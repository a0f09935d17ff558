//! The planner's predicted peak of tensor memory (model state + the activation store of
//! `megamoe_plan::activation_store`) against the CPU trainer's measured peak of live
//! tensor bytes (`memory_bytes` of a step), over configs that move different terms:
//! recompute, micro-batches, static capacity, sequence length, activation, GQA, the
//! dense layer. The planner models the tensors the code keeps, so the bar is the
//! issue's 15 % with room to spare (10 %). One test in its own binary: the live-bytes
//! counter is process-wide.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use megamoe_plan::RawConfig;
use megamoe_tensor::Device;
use megamoe_train::{predicted_peak_bytes, DataSource, Tokenizer, Trainer, TrainerOptions};

const CONFIG: &str = r#"
[model]
vocab_size = 256
d_model = 64
n_layers = 4
n_heads = 4
n_kv_heads = 2
ffn_hidden = 256
seq_len = 64

[moe]
routed_experts = 8
top_k = 2
expert_hidden = 128
shared_experts = 1
shared_expert_hidden = 128
first_dense_layers = 1
z_loss_weight = 0.001

[train]
global_batch = 16
steps = 4

[optim]
warmup_steps = 2
"#;

/// (measured peak of the second step, predicted peak), bytes.
fn measured_and_predicted(sets: &[&str]) -> (u64, u64) {
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
    let m = t.step().unwrap();
    let predicted = predicted_peak_bytes(t.plan(), Device::Cpu).unwrap();
    (m.memory_bytes.unwrap(), predicted)
}

#[test]
fn planner_peak_is_within_ten_percent_of_the_measured_peak() {
    let cases: &[&[&str]] = &[
        &[],
        &["train.recompute=\"full\""],
        &["parallel.microbatches=4"],
        &["moe.capacity_factor=1.25", "moe.pad_to_capacity=true"],
        &["model.seq_len=256", "train.global_batch=4"],
        &["moe.top_k=4", "moe.expert_hidden=64"],
        &["moe.activation=\"relu2\"", "moe.shared_experts=0"],
        &["model.n_kv_heads=4", "model.vocab_size=1024"],
        &["model.ffn_hidden=1024", "train.global_batch=8"],
    ];
    let mut worst = 0.0f64;
    for sets in cases {
        let (measured, predicted) = measured_and_predicted(sets);
        let off = predicted as f64 / measured as f64 - 1.0;
        eprintln!(
            "{sets:?}: measured {measured} B, predicted {predicted} B ({:+.1} %)",
            off * 100.0
        );
        assert!(
            off.abs() <= 0.10,
            "{sets:?}: predicted {predicted} B vs measured {measured} B ({:+.1} %)",
            off * 100.0
        );
        worst = worst.max(off.abs());
    }
    eprintln!("worst {:.1} %", worst * 100.0);
}
