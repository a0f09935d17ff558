//! Seed `shared_expert_gate_sample.py`: the always-on shared expert with a learned sigmoid
//! gate, one logit per token broadcast over d (Qwen2-MoE). A gate weight of the wrong
//! shape is an error.
#![allow(clippy::unwrap_used)] // example: a failed unwrap is a failed example

use megamoe_moe::{SharedExperts, SharedExpertsConfig, SharedExpertsParams};
use megamoe_plan::Activation;
use megamoe_tensor::{Device, Tensor};

fn main() {
    let (d, hs, n) = (8, 16, 4);
    let cfg = |gate| SharedExpertsConfig {
        num_shared_experts: 2,
        d_model: d,
        hidden: hs,
        activation: Activation::SwiGlu,
        gate,
    };
    let w = |name: &str, s: [usize; 2]| Tensor::randn_named(1, name, s, 0.3, Device::Cpu).unwrap();
    let mut p = SharedExpertsParams {
        gate_proj: Some(w("g", [hs, d])),
        up_proj: w("u", [hs, d]),
        down_proj: w("d", [d, hs]),
        gate: None,
    };
    let x = Tensor::randn_named(2, "x", [n, d], 1.0, Device::Cpu).unwrap();
    let (plain, _) = SharedExperts::new(cfg(false)).forward(&p, &x).unwrap();
    p.gate = Some(w("w_g", [1, d]));
    let (gated, _) = SharedExperts::new(cfg(true)).forward(&p, &x).unwrap();
    let sig = x
        .matmul(p.gate.as_ref().unwrap(), false, true)
        .unwrap()
        .sigmoid()
        .unwrap()
        .to_host_f32()
        .unwrap();
    let (pl, gt) = (plain.to_host_f32().unwrap(), gated.to_host_f32().unwrap());
    for t in 0..n {
        println!(
            "token {t}: gate σ(x·w_g) = {:.4}, |shared| {:.4} → |gated| {:.4}",
            sig[t],
            pl[t * d..(t + 1) * d]
                .iter()
                .map(|v| v * v)
                .sum::<f32>()
                .sqrt(),
            gt[t * d..(t + 1) * d]
                .iter()
                .map(|v| v * v)
                .sum::<f32>()
                .sqrt()
        );
        assert!(sig[t] > 0.0 && sig[t] < 1.0);
        for j in 0..d {
            assert!((gt[t * d + j] - sig[t] * pl[t * d + j]).abs() <= 1e-6);
        }
    }
    // A [d, d] gate would not broadcast as one logit per token: named error.
    p.gate = Some(w("bad", [d, d]));
    let err = SharedExperts::new(cfg(true)).forward(&p, &x).unwrap_err();
    println!("wrong gate shape → error: {err}");
    assert!(err.to_string().contains("shared_expert_gate.weight"));
}
