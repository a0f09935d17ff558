//! Seed `moe_group_routing_sample.py`: two-stage group-limited routing (DeepSeek-V3).
//! Group score = sum of the top-2 scores in a group; keep the best M groups; top-k inside.
#![allow(clippy::unwrap_used)] // example: a failed unwrap is a failed example

use megamoe_moe::{MoeConfig, Router, RouterParams, Slot};
use megamoe_tensor::{Device, Tensor};

fn main() {
    // E = 16 in G = 4 groups of 4, keep M = 2 groups, k = 4, sigmoid scores.
    let cfg = MoeConfig::from_toml_str(
        "[model]\nvocab_size = 16\nd_model = 16\nn_layers = 1\nn_heads = 1\nffn_hidden = 8\n\
         seq_len = 8\n[moe]\nrouted_experts = 16\ntop_k = 4\nscore_fn = \"sigmoid\"\n\
         n_groups = 4\ntopk_groups = 2\n",
    )
    .unwrap();
    let g = cfg.router.group_routing.unwrap();
    println!(
        "groups {} × {} experts, keep {} groups → {} eligible experts, intra-group k {}",
        g.n_groups, g.experts_per_group, g.topk_groups, g.eligible_experts, g.intra_group_k
    );
    let router = Router::new(cfg.router.clone());
    let p = RouterParams {
        weight: Tensor::randn_named(3, "router", [16, 16], 0.5, Device::Cpu).unwrap(),
        null_weight: None,
        expert_bias: None,
    };
    let x = Tensor::randn_named(4, "x", [8, 16], 1.0, Device::Cpu).unwrap();
    let (routing, _) = router.forward(&p, &x).unwrap();
    let slots = routing.slots.to_host_i32().unwrap();
    // The mask the router applied, recomputed from the scores for display.
    let masked = x
        .matmul(&p.weight, false, true)
        .unwrap()
        .sigmoid()
        .unwrap()
        .group_limited_mask(4, 2)
        .unwrap()
        .to_host_f32()
        .unwrap();
    for t in 0..8 {
        let chosen: Vec<Slot> = slots[t * 4..t * 4 + 4]
            .iter()
            .map(|&s| Slot::from_pool_index(s as usize, 16))
            .collect();
        let kept_groups: Vec<usize> = (0..4)
            .filter(|gi| masked[t * 16 + gi * 4].is_finite())
            .collect();
        println!("token {t}: kept groups {kept_groups:?}, experts {chosen:?}");
        assert_eq!(kept_groups.len(), 2);
        for s in &slots[t * 4..t * 4 + 4] {
            assert!(
                kept_groups.contains(&(*s as usize / 4)),
                "expert outside the kept groups"
            );
        }
    }
}
