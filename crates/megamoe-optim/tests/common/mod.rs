//! Shared test helpers.
#![allow(dead_code)]

use megamoe_plan::{LrSchedule, MuonPlan, MuonScale, OptimPlan, OptimizerKind};
use megamoe_tensor::{Device, Tensor};

/// An f32 CPU tensor.
pub fn t(data: &[f32], dims: &[usize]) -> Tensor {
    Tensor::from_vec_f32(data.to_vec(), dims.to_vec(), Device::Cpu).unwrap()
}

/// Host values.
pub fn host(x: &Tensor) -> Vec<f32> {
    x.to_host_f32().unwrap()
}

/// Deterministic pseudo-random values in [-1, 1) (splitmix64), independent of the crate.
pub fn rand_vec(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
    (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            ((z >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32
        })
        .collect()
}

/// A random tensor.
pub fn rand_t(seed: u64, dims: &[usize]) -> Tensor {
    let n = dims.iter().product();
    t(&rand_vec(seed, n), dims)
}

/// max |a−b| / max(max |b|, tiny).
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b
        .iter()
        .fold(0.0f64, |m, &v| m.max(v.abs() as f64))
        .max(1e-30);
    let diff = a
        .iter()
        .zip(b)
        .fold(0.0f64, |m, (&x, &y)| m.max((x as f64 - y as f64).abs()));
    diff / scale
}

/// An AdamW plan.
pub fn adamw_plan(lr: f64, wd: f64) -> OptimPlan {
    OptimPlan {
        kind: OptimizerKind::AdamW,
        lr,
        min_lr: 0.0,
        warmup_steps: 0,
        lr_schedule: LrSchedule::Constant,
        weight_decay: wd,
        beta1: 0.9,
        beta2: 0.99,
        eps: 1e-8,
        grad_clip: None,
        muon: None,
    }
}

/// A Muon plan (AdamW lr `lr`, Muon lr `muon_lr`).
pub fn muon_plan(lr: f64, muon_lr: f64, wd: f64, scale: MuonScale, nesterov: bool) -> OptimPlan {
    OptimPlan {
        kind: OptimizerKind::Muon,
        muon: Some(MuonPlan {
            momentum: 0.95,
            nesterov,
            scale,
            lr: muon_lr,
        }),
        ..adamw_plan(lr, wd)
    }
}
