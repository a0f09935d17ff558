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
//!
//! Paired mode (for a loaded machine): `<bench binary> --paired [--samples N] [--shape S]
//! [--variant V]` (or `cargo bench -p megamoe-moe --bench moe -- --paired`) times each MoE
//! sample right after one dense-GEMM sample and reports the median of the per-pair
//! fractions, which cancels most of the load other processes put on the machine. Shapes
//! `small`, `medium`; variants `fwd`, `fwd_bwd`, `static_fwd_bwd` (default: all).
#![allow(clippy::unwrap_used)] // bench setup: a failed unwrap is a failed bench

use std::time::Instant;

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

/// The value after `--name` in `args`, if any.
fn arg_value<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    let i = args.iter().position(|a| a == name)?;
    args.get(i + 1).map(String::as_str)
}

/// The `q`-quantile (0..=1) of `v` (sorted in place), nearest rank.
fn quantile(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * q).round() as usize]
}

/// Seconds one call of `f` takes.
fn time_once<T>(f: &mut impl FnMut() -> T) -> f64 {
    let t0 = Instant::now();
    let out = f();
    let dt = t0.elapsed().as_secs_f64();
    drop(out);
    dt
}

/// One MoE step of `variant` (forward only, or forward + backward into a gradient buffer
/// that lives across calls) and how many dense GEMMs of the forward's FLOPs it is worth.
fn moe_step(label: &str, variant: &str) -> (Box<dyn FnMut()>, f64) {
    let extra = match variant {
        "static_fwd_bwd" => "capacity_factor = 1.25\npad_to_capacity = true\n",
        _ => "",
    };
    let (layer, p, x, dy) = setup_with(label, extra);
    if variant == "fwd" {
        return (
            Box::new(move || drop(layer.forward(&p, &x).unwrap().0.y)),
            1.0,
        );
    }
    let mut g = p.zeros_like().unwrap();
    let step = move || {
        let (_, saved) = layer.forward(&p, &x).unwrap();
        drop(
            layer
                .backward(&p, &dy, saved, RouterLossScale::zero(), &mut g)
                .unwrap(),
        );
    };
    (Box::new(step), 3.0)
}

/// Paired mode (see the crate docs): per (shape, variant), `samples` pairs of one dense
/// GEMM then one MoE step; prints the median, quartiles and extremes of the per-pair
/// fraction `worth · t_dense / t_moe`, the median times and the fraction of the fastest
/// samples.
fn paired(args: &[String]) {
    let samples: usize = arg_value(args, "--samples").map_or(50, |s| s.parse().unwrap());
    let shapes: Vec<&str> = arg_value(args, "--shape").map_or(vec!["small", "medium"], |s| vec![s]);
    let variants: Vec<&str> =
        arg_value(args, "--variant").map_or(vec!["fwd", "fwd_bwd", "static_fwd_bwd"], |v| vec![v]);
    println!(
        "paired: {samples} samples per row, fraction = worth·t_dense/t_moe per pair \
         (fwd worth 1, fwd+bwd 3)"
    );
    println!(
        "{:<7} {:<15} {:>8} {:>8} {:>8} {:>8} {:>8} {:>11} {:>11} {:>9}",
        "shape", "variant", "median", "p25", "p75", "min", "max", "dense ms", "moe ms", "of mins"
    );
    for label in &shapes {
        let (t, d, _, k, h) = shape(label);
        let a = Tensor::randn_named(4, "a", [t * k, d], 1.0, Device::Cpu).unwrap();
        let w = Tensor::randn_named(5, "w", [3 * h, d], 1.0, Device::Cpu).unwrap();
        let mut dense = || a.matmul(&w, false, true).unwrap();
        for variant in &variants {
            let (mut moe, worth) = moe_step(label, variant);
            for _ in 0..3 {
                time_once(&mut dense);
                time_once(&mut moe);
            }
            let (mut fr, mut td, mut tm) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..samples {
                let d = time_once(&mut dense);
                let m = time_once(&mut moe);
                fr.push(worth * d / m);
                td.push(d * 1e3);
                tm.push(m * 1e3);
            }
            // "of mins": worth · fastest dense / fastest MoE sample, the least disturbed
            // of each on a loaded machine.
            let of_mins = worth * quantile(&mut td, 0.0) / quantile(&mut tm, 0.0);
            println!(
                "{:<7} {:<15} {:>7.1}% {:>7.1}% {:>7.1}% {:>7.1}% {:>7.1}% {:>11.3} {:>11.3} {:>8.1}%",
                label,
                variant,
                100.0 * quantile(&mut fr, 0.5),
                100.0 * quantile(&mut fr, 0.25),
                100.0 * quantile(&mut fr, 0.75),
                100.0 * quantile(&mut fr, 0.0),
                100.0 * quantile(&mut fr, 1.0),
                quantile(&mut td, 0.5),
                quantile(&mut tm, 0.5),
                100.0 * of_mins,
            );
        }
    }
}

fn main() {
    // The setting: 2 CPU cores.
    rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build_global()
        .unwrap();
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--paired") {
        paired(&args);
    } else {
        divan::main();
    }
}
