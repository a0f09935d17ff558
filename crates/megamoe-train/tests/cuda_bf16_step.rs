//! `train.dtype = "bf16"` on the GPU (bf16 activations, gradients and GEMM operands; f32
//! master weights, moments and accumulation) against the f32 GPU run of the same
//! configs/tiny.toml steps, from the same initial weights and data: every per-step total
//! loss within [`LOSS_TOL`] relative, every step finite, and the bf16 run learns (its
//! last loss below its first). Its own test binary: the backend's precision is
//! process-wide, so the two runs go one after the other. Needs feature `cuda` and an NVIDIA
//! GPU (`#[ignore]`d: run the test binary with `--ignored` there).
#![cfg(feature = "cuda")]
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use megamoe_plan::RawConfig;
use megamoe_tensor::{DType, Device};
use megamoe_train::{DataSource, Tokenizer, Trainer, TrainerOptions};

const TINY: &str = include_str!("../../../configs/tiny.toml");
const STEPS: usize = 50;
/// Per-step relative difference of the total loss, bf16 vs f32, over 50 steps: bf16
/// rounding of every activation (8 significant bits) compounds through the steps.
const LOSS_TOL: f64 = 3e-2;

/// A trainer of configs/tiny.toml with `sets` on GPU 0 (synthetic bytes).
fn tiny_trainer(sets: &[String]) -> Trainer {
    let raw = RawConfig::from_toml_str_with_overrides(TINY, sets).unwrap();
    let data = Arc::new(DataSource::synthetic(Tokenizer::bytes()));
    let options = TrainerOptions {
        peak_flops: None,
        device: Device::Cuda(0),
    };
    Trainer::new(&raw, data, options).unwrap()
}

fn run(dtype: &str) -> Vec<f64> {
    let mut t = tiny_trainer(&[format!("train.dtype=\"{dtype}\"")]);
    let backend = megamoe_tensor::cuda::cuda_backend(0).unwrap();
    assert_eq!(
        backend.bf16_activations(),
        dtype == "bf16",
        "{dtype}: backend mode"
    );
    (0..STEPS)
        .map(|_| {
            let m = t.step().unwrap();
            assert!(!m.skipped, "{dtype}: step {} skipped", m.step);
            m.loss.total
        })
        .collect()
}

#[test]
#[ignore = "needs an NVIDIA GPU: run the test binary with --ignored there"]
fn bf16_training_on_the_gpu_tracks_the_f32_loss_curve() {
    let f32_run = run("f32");
    let bf16_run = run("bf16");
    let mut worst = 0f64;
    for (i, (a, b)) in f32_run.iter().zip(&bf16_run).enumerate() {
        let r = (b - a).abs() / a.abs();
        worst = worst.max(r);
        eprintln!("  step {:>2}: f32 {a:.6}  bf16 {b:.6}  rel {r:.2e}", i + 1);
        assert!(b.is_finite(), "step {}: bf16 loss {b}", i + 1);
        assert!(r <= LOSS_TOL, "step {}: rel {r:e} > {LOSS_TOL:e}", i + 1);
    }
    eprintln!("  worst per-step rel difference over {STEPS} steps: {worst:.3e}");
    let (first, last) = (bf16_run[0], bf16_run[STEPS - 1]);
    assert!(last < first, "bf16 run did not learn: {first} -> {last}");
    // An activation of the bf16 run really is bf16 (not an f32 run under another name).
    let x = megamoe_tensor::Tensor::randn_named(1, "x", vec![4, 8], 1.0, Device::Cuda(0))
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    assert_eq!(
        x.unary(megamoe_tensor::UnaryOp::Silu).unwrap().dtype(),
        DType::BF16
    );
}

/// Ten bf16 steps with the bf16 weight copies on or off: (total loss, gradient norm) bits
/// per step, and with copies on the copies' fills and the copies found written by the
/// flat AdamW launch per step, and their addresses.
type CopyRun = (Vec<(u64, u64)>, Vec<u64>, Vec<u64>, Vec<u64>);

fn run_copies(on: bool) -> CopyRun {
    let backend = megamoe_tensor::cuda::cuda_backend(0).unwrap();
    backend.set_weight_copies(on);
    let mut t = tiny_trainer(&["train.dtype=\"bf16\"".to_string()]);
    let (mut out, mut fills, mut written, mut addresses) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..10 {
        let before = backend.weight_copy_stats();
        let m = t.step().unwrap();
        assert!(!m.skipped, "step {} skipped", m.step);
        out.push((m.loss.total.to_bits(), m.grad_norm.to_bits()));
        let after = backend.weight_copy_stats();
        fills.push(after.fills - before.fills);
        written.push(after.written - before.written);
        if i == 1 {
            addresses = backend.weight_copy_addresses();
        }
    }
    if on {
        assert_eq!(
            backend.weight_copy_addresses(),
            addresses,
            "weight copies moved between steps 2 and 10"
        );
    }
    backend.set_weight_copies(true);
    (out, fills, written, addresses)
}

#[test]
#[ignore = "needs an NVIDIA GPU: run the test binary with --ignored there"]
fn bf16_weight_copies_change_no_bit_and_are_written_by_the_optimizer() {
    let (without, fills_off, written_off, _) = run_copies(false);
    let (with, fills_on, written_on, addresses) = run_copies(true);
    assert_eq!(
        with, without,
        "losses / gradient norms with vs without weight copies"
    );
    assert!(fills_off.iter().all(|&f| f == 0), "copies made while off");
    assert!(
        written_off.iter().all(|&f| f == 0),
        "copies written while off"
    );
    // The first step fills each matmul weight's copy exactly once (registered weights
    // that no GEMM reads are never filled); from then on the flat AdamW launch writes
    // every one of them and no step casts a weight.
    let params = {
        let t = tiny_trainer(&["train.dtype=\"bf16\"".to_string()]);
        let mut n = 0u64;
        t.params().visit(&mut |_, _, _| n += 1);
        n
    };
    assert!(
        fills_on[0] > 0 && fills_on[0] <= params,
        "fills {fills_on:?} of {params} parameters"
    );
    assert!(
        fills_on[1..].iter().all(|&f| f == 0),
        "fills per step {fills_on:?}"
    );
    assert_eq!(written_on[0], 0, "written before any optimizer step");
    assert!(
        written_on[1..].iter().all(|&w| w == fills_on[0]),
        "copies found written per step {written_on:?}, {} made",
        fills_on[0]
    );
    let made = addresses.iter().filter(|&&a| a != 0).count() as u64;
    assert_eq!(made, fills_on[0], "copies made vs filled in step 1");
    eprintln!(
        "  10 steps bit-identical; {} weight copies of {params} parameters, written by AdamW from step 2",
        fills_on[0]
    );
}

/// Eight bf16 static-capacity steps, graphs on (optimizer inside) or off; after step 4
/// every parameter is scaled in place by 0.999 (a write the trainer does not make).
/// (total loss, gradient norm) bits and graph status per step, and the copies found
/// written by the optimizer over the run.
fn run_graph(graph: bool) -> (Vec<(u64, u64)>, Vec<String>, u64) {
    let sets: Vec<String> = [
        "train.dtype=\"bf16\"",
        "moe.capacity_factor=1.25",
        "moe.pad_to_capacity=true",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let backend = megamoe_tensor::cuda::cuda_backend(0).unwrap();
    let mut t = tiny_trainer(&sets);
    t.set_cuda_graph(graph);
    t.set_cuda_graph_optimizer(true);
    let written = backend.weight_copy_stats().written;
    let (mut out, mut status) = (Vec::new(), Vec::new());
    for i in 0..8 {
        if i == 4 {
            let k = megamoe_tensor::Tensor::scalar(0.999, Device::Cuda(0)).unwrap();
            t.params_mut()
                .visit_mut(&mut |_, p, _| p.scale_by_assign(&k).unwrap());
        }
        let m = t.step().unwrap();
        assert!(!m.skipped, "step {} skipped", m.step);
        out.push((m.loss.total.to_bits(), m.grad_norm.to_bits()));
        status.push(t.cuda_graph_status());
    }
    (out, status, backend.weight_copy_stats().written - written)
}

// The graph's forward reads the bf16 weight copies its AdamW wrote in the previous replay;
// a weight written in place between steps makes the trainer capture again (the copy
// would be stale), and every step stays bitwise the uncaptured one.
#[test]
#[ignore = "needs an NVIDIA GPU: run the test binary with --ignored there"]
fn graph_replays_read_the_copies_adamw_wrote_and_a_written_weight_recaptures() {
    let (eager, _, written_eager) = run_graph(false);
    let (graph, status, written_graph) = run_graph(true);
    for (i, s) in status.iter().enumerate() {
        eprintln!("  step {}: {s}", i + 1);
    }
    assert_eq!(graph, eager, "losses / gradient norms, graph vs uncaptured");
    assert!(
        written_eager > 0 && written_graph > 0,
        "{written_eager} {written_graph}"
    );
    assert_eq!(status[1], "captured (optimizer inside)", "{status:?}");
    assert_eq!(status[2], "replayed (optimizer inside)", "{status:?}");
    assert!(
        status[4].starts_with("captured again (a weight's bf16 copy"),
        "{status:?}"
    );
    assert_eq!(status[5], "replayed (optimizer inside)", "{status:?}");
}

// The step metrics report the activation bytes each step moved to pinned host memory:
// the same every step with `train.offload` set, 0 without.
#[test]
#[ignore = "needs an NVIDIA GPU: run the test binary with --ignored there"]
fn offloaded_bytes_are_a_step_metric() {
    let bytes = |offload: &str| -> Vec<u64> {
        let sets = vec![
            "train.dtype=\"bf16\"".to_string(),
            format!("train.offload={offload}"),
        ];
        let mut t = tiny_trainer(&sets);
        (0..3).map(|_| t.step().unwrap().offload_bytes).collect()
    };
    let none = bytes("[]");
    let some = bytes("[\"mlp\", \"qkv_linear\"]");
    eprintln!("  offload bytes per step: none {none:?}, mlp + qkv_linear {some:?}");
    assert!(none.iter().all(|&b| b == 0), "{none:?}");
    assert!(
        some[0] > 0 && some.iter().all(|&b| b == some[0]),
        "{some:?}"
    );
}
