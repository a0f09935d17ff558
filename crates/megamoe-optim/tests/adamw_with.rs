//! `Optimizer::step_adamw_with`, the AdamW step whose update runs elsewhere (inside a CUDA
//! graph): with `adamw_step` and the scalars of `next_adamw_step` as the update it gives
//! the bits of `Optimizer::step` (parameters, moments, step count); it refuses Muon
//! parameters and bf16 parameters (master weights) by name, before updating anything.

#![allow(clippy::unwrap_used)] // tests may unwrap (COMMON.md)

mod common;

use common::*;
use megamoe_optim::{AdamWState, NamedParams, OptimError, Optimizer, ParamRole};
use megamoe_plan::MuonScale;
use megamoe_tensor::{DType, Tensor};

fn model() -> NamedParams {
    let mut p = NamedParams::new();
    p.push("embed", rand_t(1, &[10, 4]), ParamRole::Embedding);
    p.push("layers.0.w", rand_t(2, &[12, 4]), ParamRole::Matrix);
    p.push("layers.0.norm", rand_t(4, &[4]), ParamRole::Norm);
    p
}

fn grads(p: &NamedParams, seed: u64) -> NamedParams {
    let mut i = 0;
    p.map(|x| {
        i += 1;
        Ok(rand_t(seed * 100 + i, x.dims()))
    })
    .unwrap()
}

/// One step through `step_adamw_with`, updating with the library's fused kernel.
fn step_with(opt: &mut Optimizer, p: &mut NamedParams, g: &NamedParams, lr: f64) {
    let (with, without) = (
        opt.next_adamw_step(lr, true),
        opt.next_adamw_step(lr, false),
    );
    opt.step_adamw_with(
        &mut |f| p.visit_mut("", f),
        &mut |f| g.visit("", f),
        &mut |param, m, grad, decay| {
            let h = if decay { &with } else { &without };
            Ok(param.adamw_step(&mut m.exp_avg, &mut m.exp_avg_sq, grad, h)?)
        },
    )
    .unwrap();
    opt.count_step();
}

#[test]
fn the_external_update_gives_the_bits_of_step() {
    let plan = adamw_plan(3e-3, 0.1);
    let (mut a, mut b) = (model(), model());
    let mut oa = Optimizer::new(&plan, &mut |f| a.visit("", f)).unwrap();
    let mut ob = Optimizer::new(&plan, &mut |f| b.visit("", f)).unwrap();
    for step in 0..4u64 {
        let g = grads(&a, step + 1);
        let lr = 3e-3 / (step + 1) as f64;
        oa.step(&mut |f| a.visit_mut("", f), &mut |f| g.visit("", f), lr)
            .unwrap();
        step_with(&mut ob, &mut b, &g, lr);
    }
    assert_eq!(oa.steps_taken(), ob.steps_taken());
    for ((name, x, _), (_, y, _)) in a.entries.iter().zip(&b.entries) {
        let same = host(x)
            .iter()
            .zip(host(y))
            .all(|(u, v)| u.to_bits() == v.to_bits());
        assert!(same, "{name}");
    }
    let mut sa = Vec::new();
    oa.visit_state(&mut |n, t| sa.push((n.to_string(), host(t))));
    let mut sb = Vec::new();
    ob.visit_state(&mut |n, t| sb.push((n.to_string(), host(t))));
    assert_eq!(sa, sb);
}

#[test]
fn muon_and_bf16_parameters_are_refused_by_name() {
    let mut never =
        |_: &mut Tensor, _: &mut AdamWState, _: &Tensor, _: bool| -> megamoe_optim::Result<()> {
            panic!("no update may run")
        };
    // A bf16 parameter (f32 master weights).
    let mut p = model();
    p.entries[2].1 = p.entries[2].1.to_dtype(DType::BF16).unwrap();
    let g = grads(&p, 1);
    let mut opt = Optimizer::new(&adamw_plan(1e-3, 0.0), &mut |f| p.visit("", f)).unwrap();
    let e = opt
        .step_adamw_with(
            &mut |f| p.visit_mut("", f),
            &mut |f| g.visit("", f),
            &mut never,
        )
        .unwrap_err();
    assert!(
        matches!(&e, OptimError::InvalidArgument { value, rule, .. }
            if value == "layers.0.norm" && rule.contains("f32")),
        "{e}"
    );
    // Muon.
    let mut p = model();
    let g = grads(&p, 1);
    let plan = muon_plan(1e-3, 0.02, 0.0, MuonScale::Keller, true);
    let mut opt = Optimizer::new(&plan, &mut |f| p.visit("", f)).unwrap();
    let before: Vec<Vec<f32>> = p.entries.iter().map(|(_, t, _)| host(t)).collect();
    let e = opt
        .step_adamw_with(
            &mut |f| p.visit_mut("", f),
            &mut |f| g.visit("", f),
            &mut never,
        )
        .unwrap_err();
    assert!(
        matches!(&e, OptimError::InvalidArgument { value, rule, .. }
            if value == "layers.0.w" && rule.contains("Muon")),
        "{e}"
    );
    let now: Vec<Vec<f32>> = p.entries.iter().map(|(_, t, _)| host(t)).collect();
    assert_eq!(before, now);
    assert_eq!(opt.steps_taken(), 0);
}
