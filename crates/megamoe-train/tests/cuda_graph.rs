//! Whole-step CUDA graphs on the GPU: ten steps of configs/tiny.toml in static-capacity
//! mode with graphs on, against the same run uncaptured (per-step losses, gradient norms
//! and final parameters bitwise equal) and against the CPU (1e-5 relative); a run whose
//! expert bias moves every step never replays a stale graph; a dropless run stays
//! uncaptured and says why.
//! Needs feature `cuda` and an NVIDIA GPU (`#[ignore]`d: run the test binary with
//! `--ignored` there).
#![cfg(feature = "cuda")]
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use megamoe_plan::RawConfig;
use megamoe_tensor::Device;
use megamoe_train::{DataSource, Tokenizer, Trainer, TrainerOptions};

const TINY: &str = include_str!("../../../configs/tiny.toml");
const STATIC: [&str; 2] = ["moe.capacity_factor=1.25", "moe.pad_to_capacity=true"];

struct Run {
    /// (total loss, gradient norm, host reads, graph status) per step.
    steps: Vec<(f64, f64, u64, String)>,
    /// Every parameter after the last step, in visit order.
    params: Vec<Vec<f32>>,
}

fn run(device: Device, sets: &[&str], graph: bool) -> Run {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    let raw = RawConfig::from_toml_str_with_overrides(TINY, &sets).unwrap();
    let data = Arc::new(DataSource::synthetic(Tokenizer::bytes()));
    let options = TrainerOptions {
        peak_flops: None,
        device,
    };
    let mut t = Trainer::new(&raw, data, options).unwrap();
    t.set_cuda_graph(graph);
    let steps = (0..10)
        .map(|_| {
            let m = t.step().unwrap();
            assert!(!m.skipped, "step {} skipped", m.step);
            (
                m.loss.total,
                m.grad_norm,
                m.host_reads,
                t.cuda_graph_status(),
            )
        })
        .collect();
    let mut params = Vec::new();
    t.params()
        .visit(&mut |_, p, _| params.push(p.to_host_f32().unwrap()));
    Run { steps, params }
}

/// Captured == uncaptured bitwise, both == CPU within 1e-5; returns the statuses.
fn check(sets: &[&str]) -> Vec<String> {
    let cpu = run(Device::Cpu, sets, false);
    let eager = run(Device::Cuda(0), sets, false);
    let graph = run(Device::Cuda(0), sets, true);
    for (i, ((c, e), g)) in cpu
        .steps
        .iter()
        .zip(&eager.steps)
        .zip(&graph.steps)
        .enumerate()
    {
        eprintln!(
            "  {sets:?} step {}: cpu {:.7} eager {:.7} graph {:.7} | gnorm {:.7} {:.7} | reads {} | {}",
            i + 1,
            c.0,
            e.0,
            g.0,
            e.1,
            g.1,
            g.2,
            g.3
        );
        assert_eq!(e.0.to_bits(), g.0.to_bits(), "step {}: loss", i + 1);
        assert_eq!(e.1.to_bits(), g.1.to_bits(), "step {}: grad norm", i + 1);
        let rl = (g.0 - c.0).abs() / c.0.abs();
        assert!(rl <= 1e-5, "step {}: loss vs CPU rel {rl:e}", i + 1);
        assert!(
            g.2 <= e.2,
            "step {}: {} host reads, uncaptured {}",
            i + 1,
            g.2,
            e.2
        );
    }
    assert_eq!(eager.params.len(), graph.params.len());
    for (k, (e, g)) in eager.params.iter().zip(&graph.params).enumerate() {
        let same = e.iter().zip(g).all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "parameter {k} differs after 10 steps");
    }
    graph.steps.into_iter().map(|s| s.3).collect()
}

/// A status the trainer may report.
fn valid(status: &str) -> bool {
    matches!(status, "captured" | "replayed") || status.starts_with("off (")
}

// The built-in synthetic data has several domains, whose per-batch domain uploads keep a
// run uncaptured today ("off (several data domains…)"): these tests then check that a
// graph-enabled run equals the uncaptured one bitwise; once such runs capture, the same
// checks cover the captured and replayed steps.
#[test]
#[ignore = "needs an NVIDIA GPU: run the test binary with --ignored there"]
fn graph_enabled_static_capacity_steps_equal_uncaptured_ones() {
    for sets in [
        STATIC.to_vec(),
        [&STATIC[..], &["parallel.microbatches=2"]].concat(),
    ] {
        let status = check(&sets);
        assert!(status.iter().all(|s| valid(s)), "{status:?}");
        if status[1] == "captured" {
            assert_eq!(status[0], "off (warm-up step before capture)");
            assert!(status[2..].iter().all(|s| s == "replayed"), "{status:?}");
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: run the test binary with --ignored there"]
fn a_moving_expert_bias_still_matches() {
    let sets = [&STATIC[..], &["moe.expert_bias=true"]].concat();
    let status = check(&sets);
    assert!(
        status.iter().all(|s| valid(s) && s != "replayed"),
        "{status:?}"
    );
}

#[test]
#[ignore = "needs an NVIDIA GPU: run the test binary with --ignored there"]
fn dropless_runs_uncaptured_and_says_why() {
    let status = check(&[]);
    assert!(
        status.iter().all(|s| s.starts_with("off (dropless")),
        "{status:?}"
    );
}
