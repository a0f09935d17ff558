//! AdamW against a hand-computed example, LR schedule values by formula, clipping.

#![allow(clippy::unwrap_used)] // tests may unwrap (COMMON.md)

mod common;

use common::*;
use megamoe_optim::ParamRole;
use megamoe_optim::{clip_grad_norm, global_grad_norm, NamedParams, Optimizer, Schedule};
use megamoe_plan::LrSchedule;
use megamoe_tensor::DType;

/// Two AdamW steps on p = [1, −2] with lr 0.1, β = (0.9, 0.99), ε = 1e-8, λ = 0.1,
/// g₁ = [0.5, 0.1], g₂ = [−0.2, 0.3]. By hand (PyTorch AdamW order):
///
/// step 1: p ← p(1 − 0.01) = [0.99, −1.98]; m = 0.1 g₁ = [0.05, 0.01];
///   v = 0.01 g₁² = [0.0025, 0.0001]; m̂ = m/0.1 = [0.5, 0.1]; √(v/0.01) = [0.5, 0.1];
///   p ← p − 0.1·[1, 1] = [0.89, −2.08].
/// step 2: p ← 0.99 p = [0.8811, −2.0592]; m = 0.9m + 0.1g₂ = [0.025, 0.039];
///   v = 0.99v + 0.01g₂² = [0.002875, 0.000999]; bc1 = 1 − 0.81 = 0.19, bc2 = 1 − 0.9801 = 0.0199;
///   m̂ = [0.1315789, 0.2052632]; √v̂ = √[0.1444724, 0.0502010] = [0.3800952, 0.2240558];
///   m̂/√v̂ = [0.3461737, 0.9161265]; p ← [0.8811 − 0.0346174, −2.0592 − 0.0916127]
///   = [0.8464826, −2.1508127].
#[test]
fn adamw_two_steps_match_hand_computation() {
    let plan = adamw_plan(0.1, 0.1);
    let mut params = NamedParams::new();
    params.push("w", t(&[1.0, -2.0], &[2]), ParamRole::Gate);
    let mut opt = Optimizer::new(&plan, &mut |f| params.visit("", f)).unwrap();
    let expected = [[0.89f32, -2.08], [0.846_482_6, -2.150_812_7]];
    for (g, want) in [[0.5f32, 0.1], [-0.2, 0.3]].iter().zip(expected) {
        let mut grads = NamedParams::new();
        grads.push("w", t(g, &[2]), ParamRole::Gate);
        opt.step(
            &mut |f| params.visit_mut("", f),
            &mut |f| grads.visit("", f),
            0.1,
        )
        .unwrap();
        let got = host(params.get("w").unwrap());
        for (a, b) in got.iter().zip(want) {
            assert!((a - b).abs() < 2e-6, "got {got:?}, want {want:?}");
        }
    }
    assert_eq!(opt.steps_taken(), 2);
    let mut keys = Vec::new();
    opt.visit_state(&mut |k, _| keys.push(k.to_string()));
    assert_eq!(keys, vec!["exp_avg.w", "exp_avg_sq.w"]);
}

/// Norms get no weight decay: with g = 0 the AdamW step is 0, so p stays put exactly,
/// while a Gate (decayed) parameter shrinks by (1 − lr·λ).
#[test]
fn norms_and_biases_get_no_weight_decay() {
    let plan = adamw_plan(0.1, 0.5);
    let mut params = NamedParams::new();
    params.push("norm", t(&[2.0, 3.0], &[2]), ParamRole::Norm);
    params.push("bias", t(&[2.0, 3.0], &[2]), ParamRole::Bias);
    params.push("gate", t(&[2.0, 3.0], &[2]), ParamRole::Gate);
    let grads = params.map(|x| x.scale(0.0)).unwrap();
    let mut opt = Optimizer::new(&plan, &mut |f| params.visit("", f)).unwrap();
    opt.step(
        &mut |f| params.visit_mut("", f),
        &mut |f| grads.visit("", f),
        0.1,
    )
    .unwrap();
    assert_eq!(host(params.get("norm").unwrap()), vec![2.0, 3.0]);
    assert_eq!(host(params.get("bias").unwrap()), vec![2.0, 3.0]);
    // 1 − 0.1·0.5 = 0.95
    let g = host(params.get("gate").unwrap());
    assert!(
        (g[0] - 1.9).abs() < 1e-6 && (g[1] - 2.85).abs() < 1e-6,
        "{g:?}"
    );
}

/// A bf16 parameter keeps an f32 master copy: many tiny updates accumulate in the master
/// even though each is below bf16 resolution at 1.0 (2^-8 ≈ 0.0039).
#[test]
fn bf16_params_keep_f32_master_weights() {
    let plan = adamw_plan(1e-4, 0.0);
    let mut params = NamedParams::new();
    params.push(
        "w",
        t(&[1.0], &[1]).to_dtype(DType::BF16).unwrap(),
        ParamRole::Scalar,
    );
    let grads = params.map(|_| Ok(t(&[1.0], &[1]))).unwrap();
    let mut opt = Optimizer::new(&plan, &mut |f| params.visit("", f)).unwrap();
    for _ in 0..100 {
        opt.step(
            &mut |f| params.visit_mut("", f),
            &mut |f| grads.visit("", f),
            1e-4,
        )
        .unwrap();
    }
    // With a constant gradient m̂/√v̂ = 1 exactly, so 100 steps move by 100·1e-4 = 0.01.
    assert_eq!(params.get("w").unwrap().dtype(), DType::BF16);
    let mut master = None;
    opt.visit_state(&mut |k, x| {
        if k == "master.w" {
            master = Some(host(x)[0]);
        }
    });
    let m = master.unwrap();
    assert!((m - 0.99).abs() < 1e-5, "master {m}");
    // The bf16 copy is the rounding of the master (bf16 spacing below 1 is 2^-8).
    let p = host(params.get("w").unwrap())[0];
    assert!((p - 0.99).abs() <= 0.002, "param {p}");
}

#[test]
fn schedule_values_at_warmup_end_midpoint_and_end() {
    // peak 1e-3, min 1e-4, warmup 10, total 110.
    let s = Schedule::new(LrSchedule::Cosine, 1e-3, 1e-4, 10, 110).unwrap();
    let close = |a: f64, b: f64| (a - b).abs() < 1e-15;
    assert!(close(s.lr(0), 1e-3 * 1.0 / 10.0)); // (s+1)/w
    assert!(close(s.lr(4), 1e-3 * 5.0 / 10.0));
    assert!(close(s.lr(9), 1e-3)); // warmup end reaches the peak
    assert!(close(s.lr(10), 1e-3)); // r = 0: cos 0 = 1
    assert!(close(s.lr(60), (1e-3 + 1e-4) / 2.0)); // r = 0.5: cos(π/2) = 0
                                                   // r = 0.25: min + ½(1 + √2/2)(peak − min)
    let quarter = 1e-4 + 0.5 * (1.0 + std::f64::consts::FRAC_1_SQRT_2) * 9e-4;
    assert!(close(s.lr(35), quarter));
    assert!(close(s.lr(110), 1e-4)); // end
    assert!(close(s.lr(500), 1e-4)); // clamped after the end
    let lin = Schedule::new(LrSchedule::Linear, 1e-3, 1e-4, 10, 110).unwrap();
    assert!(close(lin.lr(60), 5.5e-4));
    assert!(close(lin.lr(85), 1e-3 - 0.75 * 9e-4));
    let c = Schedule::new(LrSchedule::Constant, 1e-3, 1e-4, 10, 110).unwrap();
    assert!(close(c.lr(4), 5e-4) && close(c.lr(60), 1e-3) && close(c.lr(110), 1e-3));
    // No warmup, total ≤ warmup: peak throughout.
    let nw = Schedule::new(LrSchedule::Cosine, 1e-3, 0.0, 0, 100).unwrap();
    assert!(close(nw.lr(0), 1e-3) && close(nw.lr(50), 5e-4));
    let short = Schedule::new(LrSchedule::Cosine, 1e-3, 0.0, 10, 5).unwrap();
    assert!(close(short.lr(20), 1e-3));
}

#[test]
fn schedule_rejects_bad_numbers_by_name() {
    let e = Schedule::new(LrSchedule::Cosine, 1e-3, 2e-3, 0, 10).unwrap_err();
    assert!(e.to_string().contains("optim.min_lr=0.002"), "{e}");
    let e = Schedule::new(LrSchedule::Cosine, f64::NAN, 0.0, 0, 10).unwrap_err();
    assert!(e.to_string().contains("optim.lr=NaN"), "{e}");
}

#[test]
fn muon_lr_follows_the_same_curve() {
    let plan = muon_plan(1e-3, 0.02, 0.0, megamoe_plan::MuonScale::Keller, true);
    let s = Schedule::from_plan(&OptimPlanExt::with_schedule(plan), 100).unwrap();
    assert!((s.muon_lr(0).unwrap() - 0.02 * s.lr(0) / 1e-3).abs() < 1e-15);
    assert!((s.muon_lr(55).unwrap() - 0.02 * s.lr(55) / 1e-3).abs() < 1e-15);
}

trait OptimPlanExt {
    fn with_schedule(self) -> Self;
}
impl OptimPlanExt for megamoe_plan::OptimPlan {
    fn with_schedule(mut self) -> Self {
        self.warmup_steps = 10;
        self.min_lr = 1e-4;
        self.lr_schedule = LrSchedule::Cosine;
        self
    }
}

#[test]
fn clipping_scales_to_max_norm_and_reports_pre_clip_norm() {
    // ‖[3, 4]‖² + ‖[12]‖² = 25 + 144 = 169 → norm 13.
    let mut grads = NamedParams::new();
    grads.push("a", t(&[3.0, 4.0], &[2]), ParamRole::Matrix);
    grads.push("b", t(&[12.0], &[1]), ParamRole::Bias);
    let n = global_grad_norm(&mut |f| grads.visit("", f)).unwrap();
    assert!((n - 13.0).abs() < 1e-9);
    let r = clip_grad_norm(&mut |f| grads.visit_mut("", f), Some(1.0)).unwrap();
    assert!(r.finite && r.clipped);
    assert!((r.norm - 13.0).abs() < 1e-9);
    let s = 1.0 / (13.0 + 1e-6);
    let a = host(grads.get("a").unwrap());
    assert!((a[0] as f64 - 3.0 * s).abs() < 1e-7 && (a[1] as f64 - 4.0 * s).abs() < 1e-7);
    let after = global_grad_norm(&mut |f| grads.visit("", f)).unwrap();
    assert!((after - 1.0).abs() < 1e-6, "{after}");
    // Below the threshold nothing changes.
    let r = clip_grad_norm(&mut |f| grads.visit_mut("", f), Some(5.0)).unwrap();
    assert!(!r.clipped && r.scale == 1.0);
    assert_eq!(host(grads.get("a").unwrap()), a);
    // None only measures.
    let r = clip_grad_norm(&mut |f| grads.visit_mut("", f), None).unwrap();
    assert!(!r.clipped && (r.norm - 1.0).abs() < 1e-6);
}

#[test]
fn non_finite_norm_is_reported_and_grads_untouched() {
    let mut grads = NamedParams::new();
    grads.push("a", t(&[3.0, f32::NAN], &[2]), ParamRole::Matrix);
    grads.push("b", t(&[1.0], &[1]), ParamRole::Bias);
    let r = clip_grad_norm(&mut |f| grads.visit_mut("", f), Some(1.0)).unwrap();
    assert!(!r.finite && !r.clipped && r.norm.is_nan());
    assert_eq!(host(grads.get("b").unwrap()), vec![1.0]);
    let mut inf = NamedParams::new();
    inf.push("a", t(&[f32::INFINITY], &[1]), ParamRole::Matrix);
    let r = clip_grad_norm(&mut |f| inf.visit_mut("", f), Some(1.0)).unwrap();
    assert!(!r.finite && r.norm.is_infinite());
    let e = clip_grad_norm(&mut |f| inf.visit_mut("", f), Some(0.0)).unwrap_err();
    assert!(e.to_string().contains("optim.grad_clip=0"), "{e}");
}
