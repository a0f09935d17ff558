//! Seed `moe_loss_collection_sample.py`: aux-loss and z-loss collection after forward:
//! total = Σ_layers (aux_weight·aux_l + z_weight·z_l), defaults 0.01 / 1e-3, empty → 0,
//! and the 1/(grad_accum·num_chunks) scale applied exactly once per micro-batch.
#![allow(clippy::unwrap_used)] // example: a failed unwrap is a failed example

use megamoe_moe::{
    collect_router_losses, LayerRouterLosses, MoeConfig, MoeLayer, MoeParams, RouterLossWeights,
    StepRouterLoss,
};
use megamoe_tensor::{Device, Tensor};

fn main() {
    let cfg = MoeConfig::from_toml_str(
        "[model]\nvocab_size = 16\nd_model = 16\nn_layers = 3\nn_heads = 1\nffn_hidden = 8\n\
         seq_len = 32\n[moe]\nrouted_experts = 8\ntop_k = 2\nexpert_hidden = 8\n",
    )
    .unwrap();
    let layer = MoeLayer::new(cfg.clone()).unwrap();
    let x = Tensor::randn_named(1, "x", [32, 16], 1.0, Device::Cpu).unwrap();
    // Three MoE layers' unweighted losses from real forwards.
    let mut layers = Vec::new();
    for l in 0..3 {
        let p = MoeParams::init(&cfg, 7, &format!("model.layers.{l}.mlp.")).unwrap();
        let (out, _) = layer.forward(&p, &x).unwrap();
        let (aux, z) = (
            out.aux_loss.to_scalar_f32().unwrap(),
            out.z_loss.to_scalar_f32().unwrap(),
        );
        println!("layer {l}: aux {aux:.5}, z {z:.5}");
        layers.push(LayerRouterLosses {
            aux: aux as f64,
            z: z as f64,
        });
    }
    let w = RouterLossWeights::default();
    let total = collect_router_losses(&layers, w);
    let by_hand: f64 = layers.iter().map(|l| 0.01 * l.aux + 1e-3 * l.z).sum();
    println!(
        "collected total {total:.6} (weights aux {}, z {})",
        w.aux, w.z
    );
    assert_eq!(total, by_hand);
    assert_eq!(collect_router_losses(&[], w), 0.0);
    // 4 accumulation micro-batches × 2 pipeline chunks: each adds total/8 once.
    let mut step = StepRouterLoss::new(w, 4, 2).unwrap();
    for _ in 0..8 {
        step.add_micro_batch(&layers);
    }
    println!("step loss over 8 micro-batch chunks: {:.6}", step.total());
    assert!((step.total() - total).abs() < 1e-12);
    let scale = layer.loss_scale(4, 2).unwrap();
    println!("gradient scales: aux {:.3e}, z {:.3e}", scale.aux, scale.z);
    assert!((scale.aux as f64 - 0.01 / 8.0).abs() < 1e-9);
}
