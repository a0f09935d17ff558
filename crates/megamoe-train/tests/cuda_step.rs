//! The whole training step on the GPU (CUDA tensor backend) against the CPU backend: ten
//! steps of configs/tiny.toml (dense first layer, MoE with a shared expert, aux and z
//! losses, AdamW, clipping) from the same initial weights and data. f32 on both: per-step
//! losses and gradient norms within 1e-5 relative, and the same in static-capacity mode.
//! Needs feature `cuda` and an NVIDIA GPU (`#[ignore]`d: run the test binary with
//! `--ignored` there).
#![cfg(feature = "cuda")]
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use megamoe_plan::RawConfig;
use megamoe_tensor::Device;
use megamoe_train::{DataSource, Tokenizer, Trainer, TrainerOptions};

const TINY: &str = include_str!("../../../configs/tiny.toml");

/// (total loss, gradient norm) of each of `steps` steps on `device`.
fn run(device: Device, sets: &[&str], steps: usize) -> Vec<(f64, f64)> {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    let raw = RawConfig::from_toml_str_with_overrides(TINY, &sets).unwrap();
    let data = Arc::new(DataSource::synthetic(Tokenizer::bytes()));
    let options = TrainerOptions {
        peak_flops: None,
        device,
    };
    let mut t = Trainer::new(&raw, data, options).unwrap();
    (0..steps)
        .map(|_| {
            let m = t.step().unwrap();
            assert!(!m.skipped, "step {} skipped", m.step);
            (m.loss.total, m.grad_norm)
        })
        .collect()
}

fn compare(sets: &[&str]) {
    let cpu = run(Device::Cpu, sets, 10);
    let gpu = run(Device::Cuda(0), sets, 10);
    for (i, ((lc, gc), (lg, gg))) in cpu.iter().zip(&gpu).enumerate() {
        let rl = (lg - lc).abs() / lc.abs();
        let rg = (gg - gc).abs() / gc.abs();
        eprintln!(
            "  {sets:?} step {}: loss {lc:.7} / {lg:.7} ({rl:.1e}), gnorm rel {rg:.1e}",
            i + 1
        );
        assert!(
            rl.is_finite() && rl <= 1e-5,
            "step {}: loss rel {rl:e}",
            i + 1
        );
        assert!(
            rg.is_finite() && rg <= 1e-5,
            "step {}: grad norm rel {rg:e}",
            i + 1
        );
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: run the test binary with --ignored there"]
fn tiny_training_steps_on_the_gpu_match_the_cpu() {
    compare(&[]);
    compare(&["moe.capacity_factor=1.25", "moe.pad_to_capacity=true"]);
}
