//! The whole training step on the GPU (CUDA tensor backend) against the CPU backend: ten
//! steps of configs/tiny.toml (dense first layer, MoE with a shared expert, aux and z
//! losses, AdamW, clipping) from the same initial weights and data. f32 on both: per-step
//! losses and gradient norms within 1e-5 relative, and the same in static-capacity mode and
//! under every routing mode (sigmoid scores, null slots, group-limited routing, expert
//! bias, both drop policies, dropless). A static-capacity step reads the host at most
//! twice (the `host_reads` metric), a dropless one at most once more per MoE layer.
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
    steps_of(device, sets, steps)
        .into_iter()
        .map(|(l, g, _)| (l, g))
        .collect()
}

/// (total loss, gradient norm, host reads) of each of `steps` steps on `device`.
fn steps_of(device: Device, sets: &[&str], steps: usize) -> Vec<(f64, f64, u64)> {
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
            (m.loss.total, m.grad_norm, m.host_reads)
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

#[test]
#[ignore = "needs an NVIDIA GPU: run the test binary with --ignored there"]
fn routing_modes_on_the_gpu_match_the_cpu() {
    let fixed = ["moe.capacity_factor=1.0", "moe.pad_to_capacity=true"];
    for extra in [
        &["moe.score_fn=sigmoid", "moe.expert_bias=true"][..],
        &[
            "moe.pre_softmax=true",
            "moe.n_groups=4",
            "moe.topk_groups=2",
        ][..],
        &["moe.null_rho=0.5"][..],
        &["moe.drop_policy=position"][..],
    ] {
        let mut sets: Vec<&str> = fixed.to_vec();
        sets.extend_from_slice(extra);
        compare(&sets);
    }
    // dropless and packed capacity (no padding)
    compare(&["moe.null_rho=0.5", "moe.score_fn=sigmoid"]);
    compare(&["moe.capacity_factor=1.0"]);
}

#[test]
#[ignore = "needs an NVIDIA GPU: run the test binary with --ignored there"]
fn a_static_capacity_step_reads_the_host_at_most_twice() {
    let sets = ["moe.capacity_factor=1.25", "moe.pad_to_capacity=true"];
    let steps = steps_of(Device::Cuda(0), &sets, 3);
    let dropless = steps_of(Device::Cuda(0), &[], 3);
    for (i, (s, d)) in steps.iter().zip(&dropless).enumerate() {
        eprintln!(
            "  step {}: host reads static capacity {}, dropless {}",
            i + 1,
            s.2,
            d.2
        );
    }
    // `host_reads` is a process-wide counter: run this test alone (--test-threads=1).
    for (i, (s, d)) in steps.iter().zip(&dropless).enumerate() {
        assert!(s.2 <= 2, "step {}: {} host reads", i + 1, s.2);
        // dropless: the step's reads plus one counts read per MoE layer (tiny.toml has 3):
        // the sort's read sizes the packed rows and plans the grouped GEMMs
        assert!(d.2 <= 2 + 3, "step {}: {} host reads dropless", i + 1, d.2);
    }
}

/// Muon (Newton-Schulz orthogonalisation through the seam's batched matmuls, AdamW for
/// the rest) on the GPU: the same per-step losses and gradient norms as on the CPU.
#[test]
#[ignore = "needs an NVIDIA GPU: run the test binary with --ignored there"]
fn muon_training_steps_on_the_gpu_match_the_cpu() {
    compare(&["optim.name=\"muon\"", "optim.muon_lr=0.02"]);
}
