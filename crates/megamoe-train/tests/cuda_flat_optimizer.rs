//! The flat optimizer step (global norm and AdamW over every parameter at once) against
//! the per-parameter ops on the GPU: six steps of configs/tiny.toml, per-step losses,
//! gradient norms and final parameters bitwise equal — uncaptured (f32 and bf16), and
//! inside a whole-step CUDA graph with the optimizer captured (static capacity); the same
//! with bf16 AdamW moments (`optim.moment_dtype = "bf16"`), and a bf16 run with bf16 moments
//! captured (optimizer inside) equal to the same run uncaptured, bitwise.
//! Needs feature `cuda` and an NVIDIA GPU (`#[ignore]`d: run the test binary with
//! `--ignored` there).
#![cfg(feature = "cuda")]
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use megamoe_plan::RawConfig;
use megamoe_tensor::Device;
use megamoe_train::{DataSource, Tokenizer, Trainer, TrainerOptions};

const TINY: &str = include_str!("../../../configs/tiny.toml");

/// (loss bits, grad-norm bits) per step and every final parameter's bits.
type Run = (Vec<(u64, u64)>, Vec<Vec<u32>>);

fn run(sets: &[&str], flat: bool, graph: bool) -> Run {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    let raw = RawConfig::from_toml_str_with_overrides(TINY, &sets).unwrap();
    let data = Arc::new(DataSource::synthetic(Tokenizer::bytes()));
    let options = TrainerOptions {
        peak_flops: None,
        device: Device::Cuda(0),
    };
    let mut t = Trainer::new(&raw, data, options).unwrap();
    t.set_flat_optimizer(flat);
    t.set_cuda_graph(graph);
    t.set_cuda_graph_optimizer(graph);
    let steps = (0..6)
        .map(|_| {
            let m = t.step().unwrap();
            assert!(!m.skipped, "step {} skipped", m.step);
            (m.loss.total.to_bits(), m.grad_norm.to_bits())
        })
        .collect();
    if graph {
        let status = t.cuda_graph_status();
        assert!(status.contains("optimizer inside"), "graph: {status}");
    }
    let mut params = Vec::new();
    t.params().visit(&mut |_, p, _| {
        params.push(
            p.to_host_f32()
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect(),
        )
    });
    (steps, params)
}

fn same(sets: &[&str], graph: bool) {
    let (flat, per_param) = (run(sets, true, graph), run(sets, false, graph));
    for (i, (a, b)) in flat.0.iter().zip(&per_param.0).enumerate() {
        eprintln!("  {sets:?} graph {graph} step {}: {a:?} {b:?}", i + 1);
        assert_eq!(
            a,
            b,
            "{sets:?} graph {graph}: step {} loss, grad norm",
            i + 1
        );
    }
    assert_eq!(flat.1.len(), per_param.1.len());
    for (i, (a, b)) in flat.1.iter().zip(&per_param.1).enumerate() {
        assert!(a == b, "{sets:?} graph {graph}: parameter {i} differs");
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: run the test binary with --ignored there"]
fn flat_optimizer_equals_the_per_parameter_optimizer_bitwise() {
    same(&[], false);
    same(&["train.dtype=\"bf16\""], false);
    let stat = ["moe.capacity_factor=1.25", "moe.pad_to_capacity=true"];
    same(&stat, true);
}

const BF16_MOMENTS: &str = "optim.moment_dtype=\"bf16\"";

#[test]
#[ignore = "needs an NVIDIA GPU: run the test binary with --ignored there"]
fn bf16_moments_flat_equals_per_parameter_and_graph_equals_eager_bitwise() {
    same(&[BF16_MOMENTS], false);
    same(&["train.dtype=\"bf16\"", BF16_MOMENTS], false);
    let stat = ["moe.capacity_factor=1.25", "moe.pad_to_capacity=true"];
    same(&[&stat[..], &[BF16_MOMENTS]].concat(), true);
    // graph == eager on tiny bf16 with bf16 moments
    let sets = [&stat[..], &["train.dtype=\"bf16\"", BF16_MOMENTS]].concat();
    let (graph, eager) = (run(&sets, true, true), run(&sets, true, false));
    assert_eq!(
        graph.0, eager.0,
        "bf16, bf16 moments: losses and norms, graph vs eager"
    );
    assert!(
        graph.1 == eager.1,
        "bf16, bf16 moments: parameters, graph vs eager"
    );
    // bf16 moments change the run (they are in use), but little over six steps
    let f32_moments = run(&stat, true, false);
    let moments_bf16 = run(&[&stat[..], &[BF16_MOMENTS]].concat(), true, false);
    assert_ne!(f32_moments.1, moments_bf16.1, "bf16 moments leave a trace");
}

/// A bf16-moment run on the GPU (tiny, bf16 storage, static capacity, optimizer inside the
/// CUDA graph) saved after 3 steps and resumed in a fresh trainer repeats the straight
/// 6-step run bit for bit: losses, gradient norms and parameters (the moments come back
/// bf16 from the checkpoint and the resumed step captures its graph again).
#[test]
#[ignore = "needs an NVIDIA GPU: run the test binary with --ignored there"]
fn a_resumed_bf16_moment_run_on_the_gpu_repeats_the_straight_run_bitwise() {
    let sets: Vec<String> = [
        "moe.capacity_factor=1.25",
        "moe.pad_to_capacity=true",
        "train.dtype=\"bf16\"",
        BF16_MOMENTS,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let raw = RawConfig::from_toml_str_with_overrides(TINY, &sets).unwrap();
    let trainer = || {
        let data = Arc::new(DataSource::synthetic(Tokenizer::bytes()));
        let options = TrainerOptions {
            peak_flops: None,
            device: Device::Cuda(0),
        };
        let mut t = Trainer::new(&raw, data, options).unwrap();
        t.set_cuda_graph(true);
        t.set_cuda_graph_optimizer(true);
        t
    };
    let steps = |t: &mut Trainer, n: usize| -> Vec<(u64, u64)> {
        (0..n)
            .map(|_| {
                let m = t.step().unwrap();
                assert!(!m.skipped, "step {} skipped", m.step);
                (m.loss.total.to_bits(), m.grad_norm.to_bits())
            })
            .collect()
    };
    let bits = |t: &Trainer| {
        let mut v = Vec::new();
        t.params().visit(&mut |_, p, _| {
            v.push(
                p.to_host_f32()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect::<Vec<_>>(),
            )
        });
        v
    };
    let mut straight = trainer();
    let want = steps(&mut straight, 6);
    assert!(straight.cuda_graph_status().contains("optimizer inside"));
    let dir = std::env::temp_dir().join(format!("megamoe-cuda-bf16m-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut first = trainer();
    let mut got = steps(&mut first, 3);
    let ckpt = first.save_checkpoint(&dir).unwrap();
    drop(first);
    let mut resumed = trainer();
    resumed.load_checkpoint(&ckpt).unwrap();
    got.extend(steps(&mut resumed, 3));
    assert_eq!(got, want, "losses and gradient norms, resumed vs straight");
    assert!(
        bits(&resumed) == bits(&straight),
        "parameters, resumed vs straight"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
