//! NS5 properties from the spec, Muon against a plain f64 reimplementation, scales, expert
//! banks, fused QKV blocks.

#![allow(clippy::unwrap_used)] // tests may unwrap (COMMON.md)

mod common;

use common::*;
use megamoe_optim::muon::{muon_scale, newton_schulz5, NS5_COEFFS};
use megamoe_optim::ParamRole;
use megamoe_optim::{NamedParams, NsPrecision, Optimizer};
use megamoe_plan::MuonScale;

#[test]
fn coefficients_are_the_specs() {
    assert_eq!(NS5_COEFFS, (3.4445, -4.7750, 2.0315));
}

#[test]
fn ns5_matches_f64_reference() {
    for (m, n, seed) in [(8, 12, 1), (12, 8, 2), (10, 10, 3), (1, 5, 4), (5, 1, 5)] {
        let g = rand_vec(seed, m * n);
        let got = host(&newton_schulz5(&t(&g, &[m, n]), NsPrecision::F32).unwrap());
        let want = ns5_ref(&f64s(&g), m, n);
        let want32: Vec<f32> = want.iter().map(|&v| v as f32).collect();
        let e = rel_err(&got, &want32);
        assert!(e < 1e-5, "[{m},{n}] rel err {e}");
    }
}

#[test]
fn ns5_is_scale_invariant() {
    // NS(cG) = NS(G) for c > 0 (the input is normalised first; ε = 1e-7 is negligible here).
    let g = rand_t(7, &[12, 20]);
    let base = host(&newton_schulz5(&g, NsPrecision::F32).unwrap());
    for c in [1e-3f32, 0.5, 40.0] {
        let scaled = host(&newton_schulz5(&g.scale(c).unwrap(), NsPrecision::F32).unwrap());
        let e = rel_err(&scaled, &base);
        assert!(e < 1e-4, "c={c}: {e}");
    }
}

#[test]
fn ns5_commutes_with_transpose() {
    for (m, n, seed) in [(6, 14, 11), (14, 6, 12), (9, 9, 13)] {
        let g = rand_t(seed, &[m, n]);
        let a = newton_schulz5(&g.transpose2d().unwrap(), NsPrecision::F32).unwrap();
        let b = newton_schulz5(&g, NsPrecision::F32)
            .unwrap()
            .transpose2d()
            .unwrap();
        let e = rel_err(&host(&a), &host(&b));
        assert!(e < 1e-5, "[{m},{n}]: {e}");
    }
}

#[test]
fn ns5_singular_values_land_near_one() {
    // Random rectangular matrices with rows scaled by 1 … 0.1 (a > 3× spread of singular
    // values, none tiny): NS5 brings every singular value into the spec's ~[0.5, 1.5] band.
    for (m, n, seed) in [(16, 48, 21), (40, 12, 22), (8, 64, 23)] {
        let mut g = rand_vec(seed, m * n);
        for (i, row) in g.chunks_mut(n).enumerate() {
            let s = 0.1f32.powf(i as f32 / (m - 1) as f32);
            row.iter_mut().for_each(|v| *v *= s);
        }
        let sv_in = singular_values(&f64s(&g), m, n);
        let x = host(&newton_schulz5(&t(&g, &[m, n]), NsPrecision::F32).unwrap());
        let sv = singular_values(&f64s(&x), m, n);
        let (lo, hi) = sv
            .iter()
            .fold((f64::MAX, 0.0f64), |(a, b), &s| (a.min(s), b.max(s)));
        assert!(lo > 0.5 && hi < 1.5, "[{m},{n}] singular values {lo}..{hi}");
        let ratio_in = sv_in.iter().cloned().fold(0.0, f64::max)
            / sv_in.iter().cloned().fold(f64::MAX, f64::min);
        assert!(
            ratio_in > 3.0,
            "input spread {ratio_in} should be wide for the test to mean something"
        );
    }
}

#[test]
fn ns5_bf16_is_close_to_f32() {
    let g = rand_t(31, &[24, 40]);
    let f = host(&newton_schulz5(&g, NsPrecision::F32).unwrap());
    let b = host(&newton_schulz5(&g, NsPrecision::Bf16).unwrap());
    let e = rel_err(&b, &f);
    // bf16 has 8 significant bits (~4e-3 relative); five iterations compound it.
    assert!(e < 5e-2, "bf16 vs f32 rel err {e}");
    assert!(e > 0.0, "bf16 path must actually round");
}

#[test]
fn ns5_zero_and_empty_inputs_stay_zero() {
    let z = t(&[0.0; 6], &[2, 3]);
    assert_eq!(
        host(&newton_schulz5(&z, NsPrecision::F32).unwrap()),
        vec![0.0; 6]
    );
    let e = t(&[], &[0, 3]);
    assert_eq!(
        newton_schulz5(&e, NsPrecision::F32).unwrap().dims(),
        &[0, 3]
    );
}

#[test]
fn keller_and_moonlight_scales() {
    // keller = max(1, m/n)^½ ; moonlight = 0.2·√max(m, n)
    assert_eq!(muon_scale(MuonScale::Keller, 64, 16), 2.0);
    assert_eq!(muon_scale(MuonScale::Keller, 16, 64), 1.0);
    assert_eq!(muon_scale(MuonScale::Keller, 32, 32), 1.0);
    assert!((muon_scale(MuonScale::Moonlight, 64, 16) - 1.6).abs() < 1e-12);
    assert!((muon_scale(MuonScale::Moonlight, 16, 100) - 2.0).abs() < 1e-12);
}

fn run_muon_vs_reference(m: usize, n: usize, scale: MuonScale, nesterov: bool, blocks: &[usize]) {
    let (lr, muon_lr, wd) = (1e-3, 0.02, 0.1);
    let plan = muon_plan(lr, muon_lr, wd, scale, nesterov);
    let w0 = rand_vec(100 + m as u64, m * n);
    let mut params = NamedParams::new();
    params.push("layers.0.w", t(&w0, &[m, n]), ParamRole::Matrix);
    let mut opt = Optimizer::new(&plan, &mut |f| params.visit("", f)).unwrap();
    if !blocks.is_empty() {
        opt = opt.with_fused_split("layers.0.w", blocks).unwrap();
    }
    let (mut w, mut mom) = (f64s(&w0), vec![0.0; m * n]);
    for step in 0..3u64 {
        let g = rand_vec(200 + step, m * n);
        let mut grads = NamedParams::new();
        grads.push("layers.0.w", t(&g, &[m, n]), ParamRole::Matrix);
        // The AdamW lr of this step is lr/2; Muon follows: 0.02 · (lr/2)/lr = 0.01.
        opt.step(
            &mut |f| params.visit_mut("", f),
            &mut |f| grads.visit("", f),
            lr / 2.0,
        )
        .unwrap();
        let moon = scale == MuonScale::Moonlight;
        muon_ref_step(
            &mut w,
            &f64s(&g),
            &mut mom,
            m,
            n,
            0.95,
            nesterov,
            0.01,
            wd,
            moon,
            blocks,
        );
    }
    let w32: Vec<f32> = w.iter().map(|&v| v as f32).collect();
    let e = rel_err(&host(params.get("layers.0.w").unwrap()), &w32);
    assert!(
        e < 1e-5,
        "[{m},{n}] {scale:?} nesterov={nesterov} blocks={blocks:?}: {e}"
    );
}

#[test]
fn muon_step_matches_reference_keller_nesterov() {
    run_muon_vs_reference(12, 8, MuonScale::Keller, true, &[]);
    run_muon_vs_reference(8, 12, MuonScale::Keller, true, &[]);
}

#[test]
fn muon_step_matches_reference_moonlight_plain_momentum() {
    run_muon_vs_reference(12, 8, MuonScale::Moonlight, false, &[]);
}

#[test]
fn fused_qkv_blocks_are_orthogonalised_separately() {
    // q 8 rows, k 4, v 4 of a [16, 8] fused projection; each block has its own NS and scale.
    run_muon_vs_reference(16, 8, MuonScale::Keller, true, &[8, 4, 4]);
    run_muon_vs_reference(16, 8, MuonScale::Moonlight, true, &[8, 4, 4]);
}

#[test]
fn fused_split_on_a_local_shard_uses_seed_scaling() {
    // Declared full split [6, 3, 3] (12 rows), the parameter holds 6 rows: seed
    // qkv_local_split_sizes gives 6·6/12 = 3, 3·6/12 = 1, 1 (sum 5) + remainder 1 → [3, 1, 2].
    let plan = muon_plan(1e-3, 0.02, 0.0, MuonScale::Keller, true);
    let m_local = 6;
    let n = 5;
    let w0 = rand_vec(41, m_local * n);
    let g = rand_vec(42, m_local * n);
    let mut params = NamedParams::new();
    params.push("qkv", t(&w0, &[m_local, n]), ParamRole::Matrix);
    let mut opt = Optimizer::new(&plan, &mut |f| params.visit("", f))
        .unwrap()
        .with_fused_split("qkv", &[6, 3, 3])
        .unwrap();
    let mut grads = NamedParams::new();
    grads.push("qkv", t(&g, &[m_local, n]), ParamRole::Matrix);
    opt.step(
        &mut |f| params.visit_mut("", f),
        &mut |f| grads.visit("", f),
        1e-3,
    )
    .unwrap();
    let (mut w, mut mom) = (f64s(&w0), vec![0.0; m_local * n]);
    muon_ref_step(
        &mut w,
        &f64s(&g),
        &mut mom,
        m_local,
        n,
        0.95,
        true,
        0.02,
        0.0,
        false,
        &[3, 1, 2],
    );
    let w32: Vec<f32> = w.iter().map(|&v| v as f32).collect();
    assert!(rel_err(&host(params.get("qkv").unwrap()), &w32) < 1e-5);
}

#[test]
fn bad_fused_splits_are_named_errors() {
    let plan = muon_plan(1e-3, 0.02, 0.0, MuonScale::Keller, true);
    let mut params = NamedParams::new();
    params.push("qkv", rand_t(1, &[8, 4]), ParamRole::Matrix);
    let opt = Optimizer::new(&plan, &mut |f| params.visit("", f)).unwrap();
    let e = opt.clone().with_fused_split("qkv", &[2, 2]).unwrap_err();
    assert!(
        e.to_string().contains("[2, 2]") && e.to_string().contains("rows=8"),
        "{e}"
    );
    let e = opt.clone().with_fused_split("qkv", &[8, 0]).unwrap_err();
    assert!(e.to_string().contains("at least one row"), "{e}");
    let e = opt.with_fused_split("nope", &[4, 4]).unwrap_err();
    assert!(e.to_string().contains("`nope`"), "{e}");
}

#[test]
fn expert_bank_updates_each_expert_like_its_own_matrix() {
    let plan = muon_plan(1e-3, 0.02, 0.1, MuonScale::Keller, true);
    let (e, out, inp) = (3, 10, 6);
    let w = rand_t(51, &[e, out, inp]);
    let mut bank = NamedParams::new();
    bank.push("experts.up_proj", w.clone(), ParamRole::ExpertBank);
    let mut singles = NamedParams::new();
    for i in 0..e {
        let s = w.narrow(0, i, 1).unwrap().reshape([out, inp]).unwrap();
        singles.push(format!("expert{i}"), s, ParamRole::Matrix);
    }
    let mut opt_bank = Optimizer::new(&plan, &mut |f| bank.visit("", f)).unwrap();
    let mut opt_single = Optimizer::new(&plan, &mut |f| singles.visit("", f)).unwrap();
    for step in 0..2 {
        let g = rand_t(60 + step, &[e, out, inp]);
        let mut gb = NamedParams::new();
        gb.push("experts.up_proj", g.clone(), ParamRole::ExpertBank);
        let mut gs = NamedParams::new();
        for i in 0..e {
            let s = g.narrow(0, i, 1).unwrap().reshape([out, inp]).unwrap();
            gs.push(format!("expert{i}"), s, ParamRole::Matrix);
        }
        opt_bank
            .step(
                &mut |f| bank.visit_mut("", f),
                &mut |f| gb.visit("", f),
                1e-3,
            )
            .unwrap();
        opt_single
            .step(
                &mut |f| singles.visit_mut("", f),
                &mut |f| gs.visit("", f),
                1e-3,
            )
            .unwrap();
    }
    let got = host(bank.get("experts.up_proj").unwrap());
    for i in 0..e {
        let want = host(singles.get(&format!("expert{i}")).unwrap());
        let slice = &got[i * out * inp..(i + 1) * out * inp];
        assert_eq!(slice, want.as_slice(), "expert {i}");
    }
    // And one bank NS is not the NS of the whole stack: expert 0 alone differs from a
    // reshape of the bank to [E·out, in] orthogonalised jointly.
    let joint = newton_schulz5(&w.reshape([e * out, inp]).unwrap(), NsPrecision::F32).unwrap();
    let per = newton_schulz5(
        &w.narrow(0, 0, 1).unwrap().reshape([out, inp]).unwrap(),
        NsPrecision::F32,
    )
    .unwrap();
    assert!(rel_err(&host(&joint)[..out * inp], &host(&per)) > 1e-2);
}

/// A fused gate‖up bank `[E, 2F, H]` named `*gate_up_proj` gets the bits of Muon on two
/// separate banks `[E, F, H]`: NS5 sees every expert's gate and up matrices separately.
#[test]
fn fused_gate_up_bank_updates_like_separate_gate_and_up_banks() {
    for scale in [MuonScale::Keller, MuonScale::Moonlight] {
        let plan = muon_plan(1e-3, 0.02, 0.1, scale, true);
        let (e, f, h) = (3, 4, 6);
        let (wg, wu) = (rand_t(71, &[e, f, h]), rand_t(72, &[e, f, h]));
        let cat = |a: &megamoe_tensor::Tensor, b: &megamoe_tensor::Tensor| {
            megamoe_tensor::Tensor::cat(&[a, b], 1).unwrap()
        };
        let mut fused = NamedParams::new();
        fused.push("experts.gate_up_proj", cat(&wg, &wu), ParamRole::ExpertBank);
        let mut split = NamedParams::new();
        split.push("experts.gate_proj", wg, ParamRole::ExpertBank);
        split.push("experts.up_proj", wu, ParamRole::ExpertBank);
        let mut opt_fused = Optimizer::new(&plan, &mut |f| fused.visit("", f)).unwrap();
        let mut opt_split = Optimizer::new(&plan, &mut |f| split.visit("", f)).unwrap();
        for step in 0..2 {
            let (gg, gu) = (rand_t(80 + step, &[e, f, h]), rand_t(90 + step, &[e, f, h]));
            let mut gf = NamedParams::new();
            gf.push("experts.gate_up_proj", cat(&gg, &gu), ParamRole::ExpertBank);
            let mut gs = NamedParams::new();
            gs.push("experts.gate_proj", gg, ParamRole::ExpertBank);
            gs.push("experts.up_proj", gu, ParamRole::ExpertBank);
            opt_fused
                .step(
                    &mut |f| fused.visit_mut("", f),
                    &mut |f| gf.visit("", f),
                    1e-3,
                )
                .unwrap();
            opt_split
                .step(
                    &mut |f| split.visit_mut("", f),
                    &mut |f| gs.visit("", f),
                    1e-3,
                )
                .unwrap();
        }
        let want = cat(
            split.get("experts.gate_proj").unwrap(),
            split.get("experts.up_proj").unwrap(),
        );
        assert_eq!(
            host(fused.get("experts.gate_up_proj").unwrap()),
            host(&want),
            "{scale:?}: the fused bank has the split banks' bits"
        );
    }
}

#[test]
fn muon_routes_only_matrices_and_banks() {
    let plan = muon_plan(1e-3, 0.02, 0.1, MuonScale::Keller, true);
    let mut p = NamedParams::new();
    p.push("embed", rand_t(1, &[10, 4]), ParamRole::Embedding);
    p.push("q", rand_t(2, &[4, 4]), ParamRole::Matrix);
    p.push("experts", rand_t(3, &[2, 4, 4]), ParamRole::ExpertBank);
    p.push("norm", rand_t(4, &[4]), ParamRole::Norm);
    p.push("head", rand_t(5, &[10, 4]), ParamRole::Head);
    let opt = Optimizer::new(&plan, &mut |f| p.visit("", f)).unwrap();
    assert_eq!(
        opt.state_keys(),
        vec![
            "exp_avg.embed",
            "exp_avg_sq.embed",
            "momentum_buffer.q",
            "momentum_buffer.experts",
            "exp_avg.norm",
            "exp_avg_sq.norm",
            "exp_avg.head",
            "exp_avg_sq.head",
        ]
    );
    // Under adamw everything is AdamW.
    let opt = Optimizer::new(&adamw_plan(1e-3, 0.1), &mut |f| p.visit("", f)).unwrap();
    assert!(opt.state_keys().iter().all(|k| k.starts_with("exp_avg")));
    // A 3-D Matrix cannot go to Muon.
    let mut bad = NamedParams::new();
    bad.push("w", rand_t(1, &[2, 2, 2]), ParamRole::Matrix);
    let e = Optimizer::new(&plan, &mut |f| bad.visit("", f)).unwrap_err();
    assert!(
        e.to_string().contains("`w`") && e.to_string().contains("2-D"),
        "{e}"
    );
}

#[test]
fn bf16_newton_schulz_option_runs_in_the_optimizer() {
    let plan = muon_plan(1e-3, 0.02, 0.0, MuonScale::Keller, true);
    let mut a = NamedParams::new();
    a.push("w", rand_t(70, &[16, 24]), ParamRole::Matrix);
    let mut b = a.clone();
    let g = a.map(|x| Ok(rand_t(71, x.dims()))).unwrap();
    let mut oa = Optimizer::new(&plan, &mut |f| a.visit("", f)).unwrap();
    let mut ob = Optimizer::new(&plan, &mut |f| b.visit("", f)).unwrap();
    ob.set_ns_precision(NsPrecision::Bf16);
    let w0 = host(a.get("w").unwrap());
    oa.step(&mut |f| a.visit_mut("", f), &mut |f| g.visit("", f), 1e-3)
        .unwrap();
    ob.step(&mut |f| b.visit_mut("", f), &mut |f| g.visit("", f), 1e-3)
        .unwrap();
    let da: Vec<f32> = host(a.get("w").unwrap())
        .iter()
        .zip(&w0)
        .map(|(x, y)| x - y)
        .collect();
    let db: Vec<f32> = host(b.get("w").unwrap())
        .iter()
        .zip(&w0)
        .map(|(x, y)| x - y)
        .collect();
    let e = rel_err(&db, &da);
    assert!(e > 0.0 && e < 5e-2, "{e}");
}
