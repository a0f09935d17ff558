//! MoE layer benchmarks on the CPU backend (2 rayon threads): forward and forward+backward
//! of one layer for a small and a medium shape, beside a dense GEMM of equal FLOPs, so the
//! layer's rate can be quoted as a fraction of the machine's dense GEMM rate.
//!
//! FLOPs (swiglu): forward 6·T·k·d·h (three GEMMs of 2·T·k·d·h), fwd+bwd 3× that. The dense
//! reference is one `[T·k, d] · [3h, d]ᵀ` GEMM (= 6·T·k·d·h) for forward and three such
//! GEMMs for fwd+bwd. Fraction = t_dense / t_moe. Router, dispatch and combine are extra
//! work the dense GEMM does not do; they are what the fraction measures.
//!
//! Run: `cargo bench -p megamoe-moe --bench moe`. Results: docs/perf.md.
#![allow(clippy::unwrap_used)] // bench setup: a failed unwrap is a failed bench

use divan::Bencher;
use megamoe_moe::{MoeConfig, MoeLayer, MoeParams, RouterLossScale};
use megamoe_tensor::{Device, Tensor};

/// (label, T tokens, d model, E experts, k, h expert width).
const SHAPES: [(&str, usize, usize, usize, usize, usize); 2] = [
    ("small", 512, 256, 8, 2, 512),
    ("medium", 2048, 512, 16, 2, 1024),
];

fn shape(label: &str) -> (usize, usize, usize, usize, usize) {
    let s = SHAPES.iter().find(|s| s.0 == label).unwrap();
    (s.1, s.2, s.3, s.4, s.5)
}

fn setup(label: &str) -> (MoeLayer, MoeParams, Tensor, Tensor) {
    setup_with(label, "")
}

/// `setup` with extra `[moe]` lines (e.g. the static-capacity mode).
fn setup_with(label: &str, moe_extra: &str) -> (MoeLayer, MoeParams, Tensor, Tensor) {
    let (t, d, e, k, h) = shape(label);
    let text = format!(
        "[model]\nvocab_size = 256\nd_model = {d}\nn_layers = 1\nn_heads = 1\n\
         ffn_hidden = {h}\nseq_len = {t}\n[moe]\nrouted_experts = {e}\ntop_k = {k}\n\
         expert_hidden = {h}\n{moe_extra}"
    );
    let mut cfg = MoeConfig::from_toml_str(&text).unwrap();
    cfg.fast_paths.fused_permute = true;
    let p = MoeParams::init(&cfg, 1, "bench.").unwrap();
    let x = Tensor::randn_named(2, "x", [t, d], 1.0, Device::Cpu).unwrap();
    let dy = Tensor::randn_named(3, "dy", [t, d], 1.0, Device::Cpu).unwrap();
    (MoeLayer::new(cfg).unwrap(), p, x, dy)
}

#[divan::bench(args = ["small", "medium"], sample_count = 10, sample_size = 1)]
fn moe_forward(b: Bencher, label: &str) {
    let (layer, p, x, _) = setup(label);
    b.bench_local(|| layer.forward(&p, &x).unwrap().0.y);
}

/// Forward + backward into one gradient accumulator that lives across steps, as in
/// training (weight gradients accumulate with `+=`; the buffers are allocated once).
#[divan::bench(args = ["small", "medium"], sample_count = 10, sample_size = 1)]
fn moe_forward_backward(b: Bencher, label: &str) {
    let (layer, p, x, dy) = setup(label);
    let mut g = p.zeros_like().unwrap();
    b.bench_local(|| {
        let (_, saved) = layer.forward(&p, &x).unwrap();
        layer
            .backward(&p, &dy, saved, RouterLossScale::zero(), &mut g)
            .unwrap()
    });
}

/// As `moe_forward_backward`, but allocating fresh zero gradients inside every step (the
/// first version of this bench): adds the first-touch page faults of the gradient buffers.
#[divan::bench(args = ["small", "medium"], sample_count = 10, sample_size = 1)]
fn moe_forward_backward_fresh_grads(b: Bencher, label: &str) {
    let (layer, p, x, dy) = setup(label);
    b.bench_local(|| {
        let (_, saved) = layer.forward(&p, &x).unwrap();
        let mut g = p.zeros_like().unwrap();
        layer
            .backward(&p, &dy, saved, RouterLossScale::zero(), &mut g)
            .unwrap()
    });
}

/// Static-capacity mode (`capacity_factor = 1.25`, `pad_to_capacity`): every expert buffer
/// is C rows (pad rows included in the GEMMs: 1.25× the dropless rows at most), no host
/// read. Same fraction definition as the dropless benches (FLOPs of the dropless layer).
#[divan::bench(args = ["small", "medium"], sample_count = 10, sample_size = 1)]
fn moe_forward_backward_static_capacity(b: Bencher, label: &str) {
    let (layer, p, x, dy) = setup_with(label, "capacity_factor = 1.25\npad_to_capacity = true\n");
    let mut g = p.zeros_like().unwrap();
    b.bench_local(|| {
        let (_, saved) = layer.forward(&p, &x).unwrap();
        layer
            .backward(&p, &dy, saved, RouterLossScale::zero(), &mut g)
            .unwrap()
    });
}

/// One dense GEMM with the forward's FLOPs: `[T·k, d] · [3h, d]ᵀ`.
#[divan::bench(args = ["small", "medium"], sample_count = 10, sample_size = 1)]
fn dense_gemm_equal_flops(b: Bencher, label: &str) {
    let (t, d, _, k, h) = shape(label);
    let a = Tensor::randn_named(4, "a", [t * k, d], 1.0, Device::Cpu).unwrap();
    let w = Tensor::randn_named(5, "w", [3 * h, d], 1.0, Device::Cpu).unwrap();
    b.bench_local(|| a.matmul(&w, false, true).unwrap());
}

fn main() {
    // The setting: 2 CPU cores.
    rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build_global()
        .unwrap();
    divan::main();
}
