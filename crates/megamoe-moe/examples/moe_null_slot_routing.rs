//! Seed `moe_null_slot_routing_sample.py`: null slots for data-sparse routing. The router
//! scores E + n_null slots and each token picks k_max; null picks cost nothing, so tokens
//! use a variable number of real experts.
#![allow(clippy::unwrap_used)] // example: a failed unwrap is a failed example

use megamoe_moe::{MoeConfig, MoeLayer, MoeParams};
use megamoe_plan::null_slot_plan;
use megamoe_tensor::{Device, Tensor};

fn main() {
    for rho in [1.0, 0.95, 0.5, 0.25] {
        let p = null_slot_plan(8, 2, rho).unwrap();
        println!(
            "rho {rho:>4}: n_null {}, pool {}, k_max {}",
            p.n_null_copies, p.expanded_pool_size, p.k_max
        );
    }
    // E=8, k=2, rho=0.5 → n_null = floor(8·0.5/0.5) = 8, k_max = ceil(2/0.5) = 4.
    let cfg = MoeConfig::from_toml_str(
        "[model]\nvocab_size = 16\nd_model = 16\nn_layers = 1\nn_heads = 1\nffn_hidden = 8\n\
         seq_len = 64\n[moe]\nrouted_experts = 8\ntop_k = 2\nexpert_hidden = 8\nnull_rho = 0.5\n",
    )
    .unwrap();
    let ns = cfg.router.null_slots.unwrap();
    assert_eq!((ns.n_null_copies, ns.k_max), (8, 4));
    let params = MoeParams::init(&cfg, 5, "").unwrap();
    let layer = MoeLayer::new(cfg).unwrap();
    let x = Tensor::randn_named(6, "x", [64, 16], 1.0, Device::Cpu).unwrap();
    let (out, saved) = layer.forward(&params, &x).unwrap();
    let stats = out.stats.to_host().unwrap();
    let slots = saved.routing().slots.to_host_i32().unwrap();
    let mut per_token = [0usize; 5];
    for t in 0..64 {
        per_token[slots[t * 4..t * 4 + 4].iter().filter(|&&s| s < 8).count()] += 1;
    }
    println!("tokens by number of real experts (0..=4): {per_token:?}");
    println!(
        "null share {:.3}, mean real experts per token {:.3}, tokens per expert {:?}",
        stats.null_share, stats.mean_real_experts_per_token, stats.tokens_per_expert
    );
    assert!(stats.null_share > 0.0 && stats.null_share < 1.0);
    assert!((stats.mean_real_experts_per_token - 4.0 * (1.0 - stats.null_share)).abs() < 1e-9);
    assert_eq!(stats.real_picks + stats.null_picks, 64 * 4);
    assert_eq!(stats.dropped, 0, "dropless");
}
