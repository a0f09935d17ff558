//! Seed `expert_parallel_routing_sample.py`: capacity math, then capacity applied to a
//! real routing — how many assignments each expert keeps and how many are dropped.
#![allow(clippy::unwrap_used)] // example: a failed unwrap is a failed example

use megamoe_moe::capacity::{apply_capacity, expert_capacity};
use megamoe_moe::{MoeConfig, Router, RouterParams};
use megamoe_plan::{expert_parallel_routing_sample, DropPolicy};
use megamoe_tensor::{Device, Tensor};

fn main() {
    // The seed's summary: 1024 tokens, 8 experts, top-2, capacity factor 1.0.
    let s = expert_parallel_routing_sample(1024, 8, 2, 1, "token_choice", 1.0);
    println!(
        "routed tokens T·k = {}, capacity per expert C = ceil(T·k/E·cf) = {}, router outputs = {}",
        s.routed_tokens, s.capacity_per_expert, s.router_outputs
    );
    assert_eq!(
        (s.routed_tokens, s.capacity_per_expert, s.router_outputs),
        (2048, 256, 9)
    );
    for cf in [0.5, 1.0, 1.25, 2.0] {
        println!("  cf {cf:>4}: C = {}", expert_capacity(1024, 2, 8, cf));
    }

    // A real router on 64 tokens, E = 8, k = 2, cf 0.75 → C = ceil(128/8·0.75) = 12.
    let cfg = MoeConfig::from_toml_str(
        "[model]\nvocab_size = 16\nd_model = 16\nn_layers = 1\nn_heads = 1\nffn_hidden = 8\n\
         seq_len = 64\n[moe]\nrouted_experts = 8\ntop_k = 2\ncapacity_factor = 0.75\n",
    )
    .unwrap();
    let c = cfg.capacity_for(64).unwrap();
    assert_eq!(c, 12);
    let router = Router::new(cfg.router.clone());
    let p = RouterParams {
        weight: Tensor::randn_named(1, "router", [8, 16], 0.5, Device::Cpu).unwrap(),
        null_weight: None,
        expert_bias: None,
    };
    let x = Tensor::randn_named(2, "x", [64, 16], 1.0, Device::Cpu).unwrap();
    let (routing, _) = router.forward(&p, &x).unwrap();
    for policy in [DropPolicy::Probs, DropPolicy::Position] {
        let keep = apply_capacity(&routing, 8, Some(c), policy).unwrap();
        let perm = routing.slots.sort_by_expert(&keep, 8).unwrap();
        let counts = perm.counts.to_host_i32().unwrap();
        let kept: i32 = counts.iter().sum();
        let dropped = 64 * 2 - kept;
        println!("policy {policy}: kept per expert {counts:?}, dropped {dropped}");
        assert!(
            counts.iter().all(|&n| n as usize <= c),
            "capacity never exceeded"
        );
        assert_eq!(kept + dropped, 128, "Σ counts = T·k − dropped");
    }
}
