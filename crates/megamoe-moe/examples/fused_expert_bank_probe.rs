//! Seed `fused_expert_bank_probe_sample.py`: the grouped expert-bank compute surface.
//! Ragged groups (an empty expert included) through the grouped-GEMM bank and the
//! per-expert reference loop must agree.
#![allow(clippy::unwrap_used)] // example: a failed unwrap is a failed example

use megamoe_moe::{
    compare_expert_banks, ExpertBank, GroupedExperts, RoutedExpertsConfig, RoutedExpertsParams,
};
use megamoe_plan::Activation;
use megamoe_tensor::{Device, RowGroups, Tensor};

fn main() {
    let (e, d, h) = (4, 16, 32);
    let sizes = [5, 0, 9, 2];
    let rows: usize = sizes.iter().sum();
    let x = Tensor::randn_named(1, "x", [rows, d], 1.0, Device::Cpu).unwrap();
    let dy = Tensor::randn_named(2, "dy", [rows, d], 1.0, Device::Cpu).unwrap();
    for act in [Activation::SwiGlu, Activation::Relu2, Activation::Gelu] {
        let cfg = RoutedExpertsConfig {
            num_routed_experts: e,
            d_model: d,
            hidden: h,
            activation: act,
        };
        let w = |n: &str, s: [usize; 3]| Tensor::randn_named(3, n, s, 0.25, Device::Cpu).unwrap();
        // swiglu: gate and up fused as one [E, 2h, d] bank (gate rows, then up rows).
        let rows_in = if act == Activation::SwiGlu { 2 * h } else { h };
        let p = RoutedExpertsParams {
            in_proj: w("u", [e, rows_in, d]),
            down_proj: w("d", [e, d, h]),
        };
        let groups = RowGroups::from_sizes(&sizes, Device::Cpu).unwrap();
        let (y, _) = GroupedExperts { cfg }.forward(&p, &x, &groups).unwrap();
        let worst = compare_expert_banks(cfg, &p, &x, &sizes, &dy).unwrap();
        println!(
            "{act}: x [{rows}, {d}] in groups {sizes:?} → y {:?}; grouped vs sequential (y, dx, dW) worst rel. diff {worst:.2e}",
            y.dims()
        );
        assert_eq!(y.dims(), &[rows, d]);
        assert!(worst <= 1e-6);
    }
}
