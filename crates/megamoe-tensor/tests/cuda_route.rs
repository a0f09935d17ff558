//! The fused router (`Tensor::route` on CUDA: one kernel) against its definition on the CPU
//! (the composed ops), for every routing mode: softmax before top-k, sigmoid, softmax after
//! top-k; with and without expert bias, group-limited mask, null slots, renormalisation and
//! a route scale. Chosen slots equal exactly (ties → lower slot: half the tokens have
//! logits on a coarse grid, so exact ties are common), gates / raw gates / probabilities /
//! logsumexp within 1e-6 (max abs and L2 relative); the backward (`route_backward`, one
//! kernel) likewise. Shapes past the kernel's limits run the composed fallback and agree too.
//! Needs feature `cuda` and an NVIDIA GPU (`#[ignore]`d: run the test binary with
//! `--ignored --test-threads=1` there).
#![cfg(feature = "cuda")]
#![allow(clippy::unwrap_used)]

mod common;

use common::rand_vec;
use megamoe_tensor::ops::router::{RouteLossGrads, RouteSaved, RouteScore, RouteSpec, Routed};
use megamoe_tensor::{DType, Device, Tensor};

const GPU: Device = Device::Cuda(0);

fn gpu(t: &Tensor) -> Tensor {
    t.to_device(GPU).unwrap()
}

/// `got` (GPU) equals `want` (CPU): shape, dtype; i32 exactly; f32 within `tol` both max
/// absolute and L2 relative (equal infinities pass).
fn same(name: &str, got: &Tensor, want: &Tensor, tol: f64) {
    assert_eq!(got.device(), GPU, "{name}: result left the GPU");
    assert_eq!(got.dims(), want.dims(), "{name}: shape");
    assert_eq!(got.dtype(), want.dtype(), "{name}: dtype");
    if want.dtype() == DType::I32 {
        assert_eq!(
            got.to_host_i32().unwrap(),
            want.to_host_i32().unwrap(),
            "{name}"
        );
        return;
    }
    let (g, w) = (got.to_host_f32().unwrap(), want.to_host_f32().unwrap());
    let (mut num, mut den, mut max) = (0f64, 0f64, 0f64);
    for (i, (&a, &b)) in g.iter().zip(&w).enumerate() {
        assert_eq!(a.is_nan(), b.is_nan(), "{name}: NaN at {i}");
        if a == b || a.is_nan() {
            continue;
        }
        let d = (a as f64 - b as f64).abs();
        assert!(d.is_finite(), "{name}: {a} vs {b} at {i}");
        max = max.max(d);
        num += d * d;
        den += (b as f64).powi(2);
    }
    let rel = (num / den.max(f64::MIN_POSITIVE)).sqrt();
    assert!(
        max <= tol && rel <= tol,
        "{name}: max abs {max:e}, rel {rel:e} > {tol:e}"
    );
}

/// `[t, pool]` logits: even tokens continuous in (-3, 3), odd tokens on a grid of 0.5 in
/// [-1, 1] (many exact ties).
fn logits(seed: u64, t: usize, pool: usize) -> Tensor {
    let u = rand_vec(seed, t * pool);
    let v = u
        .iter()
        .enumerate()
        .map(|(i, &x)| {
            if (i / pool).is_multiple_of(2) {
                3.0 * x
            } else {
                (x * 2.0).round() / 2.0
            }
        })
        .collect();
    Tensor::from_vec_f32(v, [t, pool], Device::Cpu).unwrap()
}

fn check(name: &str, z: &Tensor, bias: Option<&Tensor>, spec: &RouteSpec) {
    let want: Routed = z.route(bias, spec).unwrap();
    let got: Routed = gpu(z).route(bias.map(gpu).as_ref(), spec).unwrap();
    same(&format!("{name} slots"), &got.slots, &want.slots, 0.0);
    same(&format!("{name} gates"), &got.gates, &want.gates, 1e-6);
    same(&format!("{name} g_raw"), &got.g_raw, &want.g_raw, 1e-6);
    same(&format!("{name} probs"), &got.probs, &want.probs, 1e-6);
    same(&format!("{name} lse"), &got.lse, &want.lse, 1e-6);
    assert_eq!(got.g_masked.is_some(), want.g_masked.is_some(), "{name}");
    if let (Some(g), Some(w)) = (&got.g_masked, &want.g_masked) {
        same(&format!("{name} g_masked"), g, w, 1e-6);
    }
    assert_eq!(got.real_mask.is_some(), want.real_mask.is_some(), "{name}");
    if let (Some(g), Some(w)) = (&got.real_mask, &want.real_mask) {
        same(&format!("{name} real_mask"), g, w, 0.0);
    }
    // backward with the choice held fixed, from each device's own forward
    let (n, k) = want.slots.dims2().unwrap();
    let d_gates = Tensor::from_vec_f32(rand_vec(n as u64, n * k), [n, k], Device::Cpu).unwrap();
    let none = RouteLossGrads::default();
    let want_dz = d_gates.route_backward((&want).into(), spec, none).unwrap();
    let got_dz = gpu(&d_gates)
        .route_backward((&got).into(), spec, none)
        .unwrap();
    same(&format!("{name} d_z"), &got_dz, &want_dz, 1e-6);
    // with the router losses' terms (a random ∂aux/∂p, the z-loss through lse)
    let pool = want.probs.dims()[1];
    let coeff =
        Tensor::from_vec_f32(rand_vec(pool as u64, n * pool), [n, pool], Device::Cpu).unwrap();
    let cpu_losses = RouteLossGrads {
        aux: Some((&coeff, 0.01)),
        z: Some((&want.lse, 2e-3 / n as f32)),
    };
    let coeff_gpu = gpu(&coeff);
    let gpu_losses = RouteLossGrads {
        aux: Some((&coeff_gpu, 0.01)),
        z: Some((&got.lse, 2e-3 / n as f32)),
    };
    let want_dz = d_gates
        .route_backward((&want).into(), spec, cpu_losses)
        .unwrap();
    let got_dz = gpu(&d_gates)
        .route_backward((&got).into(), spec, gpu_losses)
        .unwrap();
    same(&format!("{name} d_z + losses"), &got_dz, &want_dz, 1e-6);
}

#[test]
#[ignore = "needs an NVIDIA GPU: run the test binary with --ignored there"]
fn fused_router_matches_the_composed_cpu_ops_in_every_mode() {
    let t = 515; // not a multiple of the block
    let e = 16;
    let scores = [
        RouteScore::Softmax,
        RouteScore::Sigmoid,
        RouteScore::SoftmaxAfterTopk,
    ];
    let mut cases = 0;
    for (si, &score) in scores.iter().enumerate() {
        for n_null in [0, 3] {
            let pool = e + n_null;
            for with_bias in [false, true] {
                for groups in [None, Some((4, 2))] {
                    if groups.is_some() && n_null > 0 {
                        continue; // the group mask splits the pool: groups need E | 4
                    }
                    for (normalize, scale) in [(true, 1.0), (false, 2.5)] {
                        let seed = 100 + cases as u64;
                        let z = logits(seed, t, pool);
                        let b = Tensor::from_vec_f32(
                            rand_vec(seed + 7, e).iter().map(|v| 0.1 * v).collect(),
                            [e],
                            Device::Cpu,
                        )
                        .unwrap();
                        let spec = RouteSpec {
                            n_real: e,
                            k: if n_null > 0 { 5 } else { 4 },
                            score,
                            groups,
                            normalize,
                            eps: 1e-20,
                            scale,
                        };
                        let name = format!(
                            "score {si} null {n_null} bias {with_bias} groups {groups:?} \
                             normalize {normalize}"
                        );
                        check(&name, &z, with_bias.then_some(&b), &spec);
                        cases += 1;
                    }
                }
            }
        }
    }
    assert_eq!(cases, 36);
}

#[test]
#[ignore = "needs an NVIDIA GPU: run the test binary with --ignored there"]
fn fused_router_edges_and_the_composed_fallback_match_cpu() {
    let spec = |n_real, k| RouteSpec {
        n_real,
        k,
        score: RouteScore::Softmax,
        groups: None,
        normalize: true,
        eps: 1e-20,
        scale: 1.0,
    };
    // k = pool; one token; the kernel's largest pool; every slot null.
    check("k = pool", &logits(1, 70, 8), None, &spec(8, 8));
    check("one token", &logits(2, 1, 32), None, &spec(32, 4));
    check("pool 256", &logits(3, 200, 256), None, &spec(256, 8));
    check("all null", &logits(4, 50, 6), None, &spec(0, 2));
    // past the kernel's limits: the composed ops on the GPU.
    check(
        "pool 300 (fallback)",
        &logits(5, 100, 300),
        None,
        &spec(300, 6),
    );
    check("k 65 (fallback)", &logits(6, 40, 80), None, &spec(80, 65));
    // a group count that does not divide the pool is the composed op's named error.
    let bad = RouteSpec {
        groups: Some((3, 1)),
        ..spec(16, 2)
    };
    assert!(gpu(&logits(7, 8, 16)).route(None, &bad).is_err());
    // a slot outside the pool in the backward is reported at the next read, naming the op.
    let r = gpu(&logits(8, 4, 8)).route(None, &spec(8, 2)).unwrap();
    let bad_slots =
        gpu(&Tensor::from_vec_i32(vec![0, 1, 2, 8, 4, 5, 6, 7], [4, 2], Device::Cpu).unwrap());
    let saved = RouteSaved {
        slots: &bad_slots,
        ..(&r).into()
    };
    let d_gates = gpu(&Tensor::from_vec_f32(vec![1.0; 8], [4, 2], Device::Cpu).unwrap());
    let d_z = d_gates
        .route_backward(saved, &spec(8, 2), RouteLossGrads::default())
        .unwrap();
    let err = d_z.to_host_f32().unwrap_err().to_string();
    assert!(err.contains("route_backward"), "{err}");
    assert_eq!(d_z.to_host_f32().unwrap().len(), 32); // the record was cleared
}

#[test]
#[ignore = "needs an NVIDIA GPU: run the test binary with --ignored there"]
fn kept_slots_and_float_slot_counts_match_cpu() {
    let (t, k, pool) = (300, 4, 19);
    let r = logits(9, t, pool)
        .route(
            None,
            &RouteSpec {
                n_real: 16,
                k,
                score: RouteScore::Softmax,
                groups: None,
                normalize: true,
                eps: 1e-20,
                scale: 1.0,
            },
        )
        .unwrap();
    let keep = r
        .slots
        .capacity_keep(
            &r.gates,
            16,
            Some(60),
            megamoe_tensor::ops::routing::KeepOrder::HighestGate,
        )
        .unwrap();
    same(
        "kept_slots",
        &gpu(&r.slots).kept_slots(&gpu(&keep)).unwrap(),
        &r.slots.kept_slots(&keep).unwrap(),
        0.0,
    );
    for seg in [t, 50] {
        for kp in [None, Some(&keep)] {
            let want = r.slots.slot_counts(kp, pool, seg).unwrap();
            let got = gpu(&r.slots)
                .slot_counts(kp.map(gpu).as_ref(), pool, seg)
                .unwrap();
            same(&format!("slot_counts seg {seg}"), &got, &want, 0.0);
        }
    }
}
