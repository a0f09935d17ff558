//! The tiny MoE model and one-rank reference run shared by the layout-invariance tests
//! (`layouts.rs`, `layouts_tp.rs`): a dense layer and an MoE layer with a gated shared expert,
//! aux and z losses and the expert bias.

use std::sync::Arc;

use megamoe_plan::RawConfig;
use megamoe_train::{DataSource, StepMetrics, Tokenizer, Trainer, TrainerOptions};

pub const STEPS: usize = 10;

pub const BASE: &str = r#"
[model]
vocab_size = 256
d_model = 16
n_layers = 2
n_heads = 2
n_kv_heads = 1
ffn_hidden = 32
seq_len = 8

[moe]
routed_experts = 4
top_k = 2
expert_hidden = 16
shared_experts = 1
shared_expert_hidden = 8
shared_expert_gate = true
aux_loss = "aux"
aux_loss_weight = 0.05
z_loss_weight = 0.01
expert_bias = true
bias_update_rate = 0.01
first_dense_layers = 1

[train]
global_batch = 8
steps = 10
seed = 7

[optim]
lr = 1e-2
min_lr = 1e-3
warmup_steps = 2
grad_clip = 0.5
"#;

pub fn data() -> Arc<DataSource> {
    Arc::new(DataSource::synthetic(Tokenizer::bytes()))
}

/// (loss, grad norm) per step.
pub fn curve(metrics: &[StepMetrics]) -> Vec<(f64, f64)> {
    metrics
        .iter()
        .map(|m| (m.loss.total, m.grad_norm))
        .collect()
}

/// One rank running all `micro` micro-batches per step, on the config `raw` builds.
pub fn one_rank(raw: fn(&[String]) -> RawConfig, sets: &[String], micro: usize) -> Vec<(f64, f64)> {
    let mut sets = sets.to_vec();
    sets.push(format!("parallel.microbatches={micro}"));
    let mut t = Trainer::new(&raw(&sets), data(), TrainerOptions::default()).unwrap();
    let m: Vec<StepMetrics> = (0..STEPS).map(|_| t.step().unwrap()).collect();
    assert!(m.iter().all(|m| !m.skipped && m.loss.total.is_finite()));
    curve(&m)
}
