//! The tiny MoE model and one-rank reference run shared by the layout-invariance tests
//! (`layouts.rs`, `layouts_tp.rs`): a dense layer and an MoE layer with a gated shared expert,
//! aux and z losses and the expert bias.

use std::sync::Arc;

use megamoe_plan::RawConfig;
use megamoe_train::{DataSource, StepMetrics, Tokenizer, Trainer, TrainerOptions};

pub const STEPS: usize = 10;

pub const BASE: &str = include_str!("../fixtures/layout_moe.toml");

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
