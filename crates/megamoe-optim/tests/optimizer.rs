//! The Optimizer's contract: name checks before any update, state save/load round trip.

#![allow(clippy::unwrap_used)] // tests may unwrap (COMMON.md)

mod common;

use std::collections::HashMap;

use common::*;
use megamoe_optim::ParamRole;
use megamoe_optim::{NamedParams, OptimError, Optimizer};
use megamoe_plan::MuonScale;
use megamoe_tensor::Tensor;

fn model() -> NamedParams {
    let mut p = NamedParams::new();
    p.push("embed", rand_t(1, &[10, 4]), ParamRole::Embedding);
    p.push("layers.0.qkv", rand_t(2, &[12, 4]), ParamRole::Matrix);
    p.push(
        "layers.0.experts",
        rand_t(3, &[2, 6, 4]),
        ParamRole::ExpertBank,
    );
    p.push("layers.0.norm", rand_t(4, &[4]), ParamRole::Norm);
    p
}

fn grads_for(p: &NamedParams, seed: u64) -> NamedParams {
    let mut i = 0;
    p.map(|x| {
        i += 1;
        Ok(rand_t(seed * 100 + i, x.dims()))
    })
    .unwrap()
}

#[test]
fn errors_name_the_parameter_and_change_nothing() {
    let plan = muon_plan(1e-3, 0.02, 0.1, MuonScale::Keller, true);
    let mut p = model();
    let mut opt = Optimizer::new(&plan, &mut |f| p.visit("", f)).unwrap();
    let before: Vec<Vec<f32>> = p.entries.iter().map(|(_, t, _)| host(t)).collect();

    // Missing gradient (checked before anything is updated).
    let mut g = grads_for(&p, 1);
    g.entries.pop();
    let e = opt
        .step(&mut |f| p.visit_mut("", f), &mut |f| g.visit("", f), 1e-3)
        .unwrap_err();
    assert!(
        matches!(&e, OptimError::MissingGrad { name } if name == "layers.0.norm"),
        "{e}"
    );
    // Wrong gradient shape.
    let mut g = grads_for(&p, 1);
    g.entries[1].1 = rand_t(9, &[4, 12]);
    let e = opt
        .step(&mut |f| p.visit_mut("", f), &mut |f| g.visit("", f), 1e-3)
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("`layers.0.qkv`: gradient has shape [4, 12], expected [12, 4]"),
        "{e}"
    );
    // A gradient without a parameter.
    let mut g = grads_for(&p, 1);
    g.push("ghost", rand_t(1, &[1]), ParamRole::Scalar);
    let e = opt
        .step(&mut |f| p.visit_mut("", f), &mut |f| g.visit("", f), 1e-3)
        .unwrap_err();
    assert!(e.to_string().contains("`ghost`"), "{e}");
    // A prefix mismatch makes every name unknown.
    let g = grads_for(&p, 1);
    let e = opt
        .step(
            &mut |f| p.visit_mut("model.", f),
            &mut |f| g.visit("", f),
            1e-3,
        )
        .unwrap_err();
    assert!(matches!(e, OptimError::UnknownParam { .. }), "{e}");
    // A bad learning rate.
    let e = opt
        .step(
            &mut |f| p.visit_mut("", f),
            &mut |f| g.visit("", f),
            f64::NAN,
        )
        .unwrap_err();
    assert!(e.to_string().contains("lr=NaN"), "{e}");

    let after: Vec<Vec<f32>> = p.entries.iter().map(|(_, t, _)| host(t)).collect();
    assert_eq!(before, after);
    assert_eq!(opt.steps_taken(), 0);
    // Duplicate names at construction.
    let mut dup = model();
    dup.push("embed", rand_t(1, &[1]), ParamRole::Scalar);
    let e = Optimizer::new(&plan, &mut |f| dup.visit("", f)).unwrap_err();
    assert!(e.to_string().contains("`embed` is visited twice"), "{e}");
    // Muon without Muon settings.
    let mut no_muon = plan;
    no_muon.muon = None;
    let e = Optimizer::new(&no_muon, &mut |f| p.visit("", f)).unwrap_err();
    assert!(matches!(e, OptimError::MissingMuonPlan), "{e}");
}

fn snapshot(opt: &Optimizer) -> HashMap<String, Tensor> {
    let mut m = HashMap::new();
    opt.visit_state(&mut |k, t| {
        m.insert(k.to_string(), t.deep_copy().unwrap());
    });
    m
}

#[test]
fn state_round_trip_resumes_bit_identically() {
    for plan in [
        muon_plan(1e-3, 0.02, 0.1, MuonScale::Keller, true),
        adamw_plan(1e-3, 0.1),
    ] {
        let mut p = model();
        let mut opt = Optimizer::new(&plan, &mut |f| p.visit("", f)).unwrap();
        for s in 0..2 {
            let g = grads_for(&p, s);
            opt.step(&mut |f| p.visit_mut("", f), &mut |f| g.visit("", f), 1e-3)
                .unwrap();
        }
        // "Checkpoint": state tensors + step count + params.
        let saved = snapshot(&opt);
        let steps = opt.steps_taken();
        let mut p2 = p.map(|t| t.deep_copy()).unwrap();
        let mut opt2 = Optimizer::new(&plan, &mut |f| p2.visit("", f)).unwrap();
        opt2.load_state(steps, saved.clone()).unwrap();
        assert_eq!(opt2.steps_taken(), 2);
        for s in 2..4 {
            let g = grads_for(&p, s);
            opt.step(&mut |f| p.visit_mut("", f), &mut |f| g.visit("", f), 1e-3)
                .unwrap();
            opt2.step(&mut |f| p2.visit_mut("", f), &mut |f| g.visit("", f), 1e-3)
                .unwrap();
        }
        for ((n, a, _), (_, b, _)) in p.entries.iter().zip(&p2.entries) {
            assert_eq!(host(a), host(b), "{n} after resume ({:?})", plan.kind);
        }
        // A fresh optimizer without the state diverges (the test can fail).
        let mut p3 = p2.clone();
        let mut opt3 = Optimizer::new(&plan, &mut |f| p3.visit("", f)).unwrap();
        let g = grads_for(&p, 9);
        opt3.step(&mut |f| p3.visit_mut("", f), &mut |f| g.visit("", f), 1e-3)
            .unwrap();
        opt2.step(&mut |f| p2.visit_mut("", f), &mut |f| g.visit("", f), 1e-3)
            .unwrap();
        assert_ne!(
            host(p3.get("embed").unwrap()),
            host(p2.get("embed").unwrap())
        );
    }
}

#[test]
fn load_state_checks_keys_and_shapes() {
    let plan = muon_plan(1e-3, 0.02, 0.1, MuonScale::Keller, true);
    let p = model();
    let mut opt = Optimizer::new(&plan, &mut |f| p.visit("", f)).unwrap();
    let good = snapshot(&opt);

    let mut missing = good.clone();
    missing.remove("momentum_buffer.layers.0.qkv");
    let e = opt.load_state(5, missing).unwrap_err();
    assert!(
        e.to_string()
            .contains("`momentum_buffer.layers.0.qkv` is missing"),
        "{e}"
    );

    let mut wrong = good.clone();
    wrong.insert("exp_avg.embed".into(), rand_t(1, &[4, 10]));
    let e = opt.load_state(5, wrong).unwrap_err();
    assert!(
        e.to_string()
            .contains("`exp_avg.embed` has shape [4, 10] in the checkpoint, expected [10, 4]"),
        "{e}"
    );

    let mut extra = good.clone();
    extra.insert("exp_avg.gone".into(), rand_t(1, &[1]));
    let e = opt.load_state(5, extra).unwrap_err();
    assert!(e.to_string().contains("`exp_avg.gone`"), "{e}");
    assert_eq!(opt.steps_taken(), 0, "failed loads change nothing");

    // bf16 state in a checkpoint is accepted and widened.
    let bf: HashMap<String, Tensor> = good
        .iter()
        .map(|(k, t)| (k.clone(), t.to_dtype(megamoe_tensor::DType::BF16).unwrap()))
        .collect();
    opt.load_state(5, bf).unwrap();
    assert_eq!(opt.steps_taken(), 5);
    opt.visit_state(&mut |_, t| assert_eq!(t.dtype(), megamoe_tensor::DType::F32));
}

#[test]
fn flat_moments_are_views_at_registration_offsets_and_step_like_separate_ones() {
    let plan = muon_plan(1e-3, 0.02, 0.1, MuonScale::Keller, true);
    let (mut p_flat, mut p_sep) = (model(), model());
    let mut flat = Optimizer::new(&plan, &mut |f| p_flat.visit("", f)).unwrap();
    let mut sep = Optimizer::new(&plan, &mut |f| p_sep.visit("", f)).unwrap();
    flat.flatten_state().unwrap();
    assert!(sep.flat_state().is_none());
    for s in 1..4 {
        let g = grads_for(&p_flat, s);
        flat.step(
            &mut |f| p_flat.visit_mut("", f),
            &mut |f| g.visit("", f),
            1e-3,
        )
        .unwrap();
        sep.step(
            &mut |f| p_sep.visit_mut("", f),
            &mut |f| g.visit("", f),
            1e-3,
        )
        .unwrap();
    }
    let bits = |t: &Tensor| host(t).iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    for ((_, a, _), (_, b, _)) in p_flat.entries.iter().zip(&p_sep.entries) {
        assert_eq!(bits(a), bits(b));
    }
    // First moments (AdamW exp_avg or Muon momentum) tile one buffer in registration
    // order; exp_avg_sq (AdamW only) the other; the values are the separate state's.
    let (first, second) = flat.flat_state().unwrap();
    let (mut at_first, mut at_second) = (0, 0);
    let mut want = HashMap::new();
    sep.visit_state(&mut |k, t| {
        want.insert(k.to_string(), bits(t));
    });
    flat.visit_state(&mut |k, t| {
        let (buf, at) = if k.starts_with("exp_avg_sq.") {
            (second, &mut at_second)
        } else {
            (first, &mut at_first)
        };
        assert!(t.same_storage(buf), "{k}");
        assert_eq!(t.layout().offset(), *at, "{k}");
        *at += t.numel();
        assert_eq!(bits(t), want[k], "{k}");
    });
    assert_eq!((at_first, at_second), (first.numel(), second.numel()));
    assert_eq!(first.numel(), 10 * 4 + 12 * 4 + 2 * 6 * 4 + 4);
    // Loading into a clone lays the state out in fresh buffers: the original is untouched.
    let before = host(first);
    let mut clone = flat.clone();
    let mut zeros = Vec::new();
    flat.visit_state(&mut |k, t| {
        zeros.push((
            k.to_string(),
            Tensor::zeros(t.dims(), t.dtype(), t.device()).unwrap(),
        ))
    });
    clone.load_state(3, zeros).unwrap();
    assert_eq!(host(first), before);
    let (c_first, _) = clone.flat_state().unwrap();
    assert!(!c_first.same_storage(first));
    assert!(host(c_first).iter().all(|&v| v == 0.0));
}

/// With `optim.moment_dtype = "bf16"` the moments are bf16, not flattened (write-through
/// buffers are f32), stay bf16 through steps and a load of bf16 state, and f32 moments
/// are refused by name (they would be rounded); Muon's momentum stays f32.
#[test]
fn bf16_moments_stay_bf16_and_f32_moments_are_not_rounded_on_load() {
    use megamoe_plan::MomentDtype;
    use megamoe_tensor::DType;
    let mut plan = muon_plan(1e-3, 0.02, 0.1, MuonScale::Keller, true);
    plan.moment_dtype = MomentDtype::Bf16;
    let mut p = model();
    let mut opt = Optimizer::new(&plan, &mut |f| p.visit("", f)).unwrap();
    opt.flatten_state().unwrap();
    let dtypes = |opt: &Optimizer| {
        let mut v = Vec::new();
        opt.visit_state(&mut |k, t| v.push((k.to_string(), t.dtype())));
        v
    };
    let check = |opt: &Optimizer| {
        for (k, d) in dtypes(opt) {
            let want = if k.starts_with("exp_avg") {
                DType::BF16
            } else {
                DType::F32
            };
            assert_eq!(d, want, "{k}");
        }
    };
    check(&opt);
    let (first, second) = opt.flat_state().unwrap();
    assert_eq!(second.numel(), 0, "no f32 second moments to flatten");
    assert!(first.numel() > 0, "Muon momentum stays flat");
    let grads = p.map(|t| t.scale(0.1)).unwrap();
    for _ in 0..2 {
        opt.step(
            &mut |f| p.visit_mut("", f),
            &mut |f| grads.visit("", f),
            1e-3,
        )
        .unwrap();
    }
    check(&opt);
    let good = snapshot(&opt);
    opt.load_state(2, good.clone()).unwrap();
    check(&opt);
    let widened: HashMap<String, Tensor> = good
        .iter()
        .map(|(k, t)| (k.clone(), t.to_dtype(DType::F32).unwrap()))
        .collect();
    let e = opt.load_state(2, widened).unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("exp_avg") && text.contains("moment_dtype") && text.contains("f32"),
        "{text}"
    );
    // β above 1 - 2^-8 is refused with bf16 moments
    plan.beta2 = 0.999;
    let e = Optimizer::new(&plan, &mut |f| p.visit("", f)).unwrap_err();
    assert!(e.to_string().contains("optim.beta2"), "{e}");
}
