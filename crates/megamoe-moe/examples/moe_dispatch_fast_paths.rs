//! Seed `moe_dispatch_fast_paths.py`: optional dispatch accelerators and overlap flags.
//! `fused_permute` sorts and gathers in one op; `overlap_shared` computes the shared expert
//! concurrently with route → dispatch → experts. Every setting gives identical bits.
#![allow(clippy::unwrap_used)] // example: a failed unwrap is a failed example

use megamoe_moe::{DispatchFastPaths, MoeConfig, MoeLayer, MoeParams, RouterLossScale};
use megamoe_tensor::{Device, Tensor};

fn main() {
    let base = MoeConfig::from_toml_str(
        "[model]\nvocab_size = 16\nd_model = 32\nn_layers = 1\nn_heads = 1\nffn_hidden = 8\n\
         seq_len = 64\n[moe]\nrouted_experts = 8\ntop_k = 2\nexpert_hidden = 32\n\
         capacity_factor = 1.0\nshared_experts = 1\nshared_expert_gate = true\n",
    )
    .unwrap();
    let p = MoeParams::init(&base, 1, "").unwrap();
    let x = Tensor::randn_named(2, "x", [256, 32], 1.0, Device::Cpu).unwrap();
    let dy = Tensor::randn_named(3, "dy", [256, 32], 1.0, Device::Cpu).unwrap();
    let mut reference: Option<Vec<u32>> = None;
    for fused_permute in [false, true] {
        for overlap_shared in [false, true] {
            let mut cfg = base.clone();
            cfg.fast_paths = DispatchFastPaths {
                fused_permute,
                overlap_shared,
            };
            let layer = MoeLayer::new(cfg).unwrap();
            let (out, saved) = layer.forward(&p, &x).unwrap();
            let mut g = p.zeros_like().unwrap();
            let dx = layer
                .backward(&p, &dy, saved, RouterLossScale::zero(), &mut g)
                .unwrap();
            let mut bits: Vec<u32> = out
                .y
                .to_host_f32()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect();
            bits.extend(dx.to_host_f32().unwrap().iter().map(|v| v.to_bits()));
            let sum: f64 = out.y.to_host_f32().unwrap().iter().map(|&v| v as f64).sum();
            println!("fused_permute={fused_permute:<5} overlap_shared={overlap_shared:<5} Σy = {sum:.6}, dropped {}", out.stats.to_host().unwrap().dropped);
            match &reference {
                None => reference = Some(bits),
                Some(r) => assert_eq!(r, &bits, "fast paths must not change results"),
            }
        }
    }
    println!("all four settings agree bit for bit");
}
