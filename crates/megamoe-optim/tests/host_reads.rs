//! Sync discipline of the optimizer path: clipping reads the global norm once, however
//! many gradients; Muon (NS5 norms on the device) and AdamW read nothing. One test in its
//! own binary because the host-read counter is process-wide.

#![allow(clippy::unwrap_used)] // tests may unwrap (COMMON.md)

use megamoe_optim::muon::{newton_schulz5, newton_schulz5_batched, orthogonalize, NsPrecision};
use megamoe_optim::ParamRole;
use megamoe_optim::{clip_grad_norm, NamedParams};
use megamoe_plan::MuonScale;
use megamoe_tensor::{host_reads, Device, Tensor};

fn rand_t(seed: u64, shape: &[usize]) -> Tensor {
    Tensor::randn_named(seed, "t", shape, 1.0, Device::Cpu).unwrap()
}

#[test]
fn clip_reads_once_and_muon_reads_nothing() {
    let mut grads = NamedParams::new();
    for i in 0..12 {
        grads.push(format!("g{i}"), rand_t(i, &[8, 5]), ParamRole::Matrix);
    }
    let before = host_reads();
    let report = clip_grad_norm(&mut |f| grads.visit_mut("", f), Some(0.5)).unwrap();
    assert_eq!(host_reads() - before, 1, "one read for 12 gradients");
    assert!(report.clipped);
    // the clipped gradients have the target norm
    let mut sq = 0.0f64;
    grads.visit("", &mut |_, g, _| {
        sq += g
            .to_host_f32()
            .unwrap()
            .iter()
            .map(|&v| (v as f64).powi(2))
            .sum::<f64>()
    });
    assert!((sq.sqrt() - 0.5).abs() < 1e-5, "{}", sq.sqrt());

    let bank = rand_t(99, &[6, 7, 4]);
    let before = host_reads();
    let batched = newton_schulz5_batched(&bank, NsPrecision::F32).unwrap();
    let o = orthogonalize(&bank, &[], MuonScale::Keller, NsPrecision::F32).unwrap();
    assert_eq!(
        host_reads() - before,
        0,
        "NS5 keeps its norms on the device"
    );
    // the batched NS5 is the per-matrix NS5, bit for bit, and orthogonalize scales it
    let all = batched.to_host_f32().unwrap();
    let scaled = o.to_host_f32().unwrap();
    let s = megamoe_optim::muon::muon_scale(MuonScale::Keller, 7, 4) as f32;
    for e in 0..6 {
        let one = bank.narrow(0, e, 1).unwrap().reshape([7, 4]).unwrap();
        let want = newton_schulz5(&one, NsPrecision::F32)
            .unwrap()
            .to_host_f32()
            .unwrap();
        let got = &all[e * 28..(e + 1) * 28];
        assert!(
            got.iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "expert {e}"
        );
        let got_s = &scaled[e * 28..(e + 1) * 28];
        assert!(got_s.iter().zip(&want).all(|(a, b)| *a == b * s + 0.0));
    }
}
