//! `adamw_step` with bf16 moments on the CPU backend against a hand-written f32 reference
//! with explicit round-to-nearest-even to bf16, bitwise, over several steps on fresh random
//! inputs (with and without weight decay); the moments stay bf16; mixed moment dtypes are
//! refused by name.
#![allow(clippy::unwrap_used)]

mod common;
use common::rand_vec;
use megamoe_tensor::{AdamWStep, DType, Device, Tensor};

/// `x` rounded to the nearest bf16, ties to even, as an f32 (finite `x`).
fn round_bf16(x: f32) -> f32 {
    let b = x.to_bits();
    let lsb = (b >> 16) & 1;
    f32::from_bits(b.wrapping_add(0x7fff + lsb) & 0xffff_0000)
}

/// One AdamW step of one element in f32 (PyTorch order, constants rounded from f64 to f32),
/// moments loaded from and stored to bf16: returns (p, m, v). The weight update uses the
/// unrounded new moments.
fn reference(p: f32, m: f32, v: f32, g: f32, h: &AdamWStep) -> (f32, f32, f32) {
    let t = h.t as i32;
    let (b1, b2) = (h.beta1 as f32, h.beta2 as f32);
    let m = m * b1 + 0.0 + (1.0 - h.beta1) as f32 * g;
    let v = v * b2 + 0.0 + (1.0 - h.beta2) as f32 * (g * g);
    let vhat = v * (1.0 / (1.0 - h.beta2.powi(t))) as f32 + 0.0;
    let denom = vhat.sqrt() * 1.0 + h.eps as f32;
    let p = if h.weight_decay != 0.0 {
        p * (1.0 - h.lr * h.weight_decay) as f32 + 0.0
    } else {
        p
    };
    let p = p + (-h.lr / (1.0 - h.beta1.powi(t))) as f32 * (m / denom);
    (p, round_bf16(m), round_bf16(v))
}

#[test]
fn bf16_moment_step_matches_a_hand_written_rne_reference() {
    let n = 40_000; // several rayon tasks
    for decay in [0.0, 0.1] {
        let mut p: Vec<f32> = rand_vec(1, n);
        let mut m: Vec<f32> = rand_vec(2, n)
            .iter()
            .map(|x| round_bf16(x * 0.01))
            .collect();
        let mut v: Vec<f32> = rand_vec(3, n)
            .iter()
            .map(|x| round_bf16(x * x * 1e-4))
            .collect();
        let bf = |x: &[f32]| {
            Tensor::from_vec_f32(x.to_vec(), [n], Device::Cpu)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap()
        };
        let mut pt = Tensor::from_vec_f32(p.clone(), [n], Device::Cpu).unwrap();
        let (mut mt, mut vt) = (bf(&m), bf(&v));
        for t in 1..=4u64 {
            let g: Vec<f32> = rand_vec(10 + t, n).iter().map(|x| x * 0.05).collect();
            let h = AdamWStep {
                lr: 3e-3,
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
                weight_decay: decay,
                t,
            };
            for i in 0..n {
                (p[i], m[i], v[i]) = reference(p[i], m[i], v[i], g[i], &h);
            }
            let gt = Tensor::from_vec_f32(g, [n], Device::Cpu).unwrap();
            pt.adamw_step(&mut mt, &mut vt, &gt, &h).unwrap();
            assert_eq!((mt.dtype(), vt.dtype()), (DType::BF16, DType::BF16));
            let to_bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            let host_bits = |t: &Tensor| to_bits(&t.to_host_f32().unwrap());
            assert_eq!(host_bits(&pt), to_bits(&p), "step {t}, decay {decay}: p");
            assert_eq!(host_bits(&mt), to_bits(&m), "step {t}, decay {decay}: m");
            assert_eq!(host_bits(&vt), to_bits(&v), "step {t}, decay {decay}: v");
        }
    }
}

#[test]
fn the_reference_rounds_ties_to_even() {
    // 1 + 2^-8 is halfway between bf16 1 and 1 + 2^-7: ties to the even mantissa (1).
    assert_eq!(round_bf16(1.0 + 1.0 / 256.0), 1.0);
    // 1 + 3·2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: ties to 1 + 2^-6.
    assert_eq!(round_bf16(1.0 + 3.0 / 256.0), 1.0 + 1.0 / 64.0);
    assert_eq!(round_bf16(1.0 + 1.5 / 256.0), 1.0 + 1.0 / 128.0);
    let x = 1.0 + 1.0 / 256.0;
    assert_eq!(half::bf16::from_f32(x).to_f32(), round_bf16(x));
}

#[test]
fn mixed_moment_dtypes_are_a_named_error() {
    let mut p = Tensor::zeros([4], DType::F32, Device::Cpu).unwrap();
    let mut m = Tensor::zeros([4], DType::BF16, Device::Cpu).unwrap();
    let mut v = Tensor::zeros([4], DType::F32, Device::Cpu).unwrap();
    let g = Tensor::zeros([4], DType::F32, Device::Cpu).unwrap();
    let h = AdamWStep {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.0,
        t: 1,
    };
    let e = p.adamw_step(&mut m, &mut v, &g, &h).unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("adamw_step") && text.contains("both f32 or both bf16"),
        "{text}"
    );
}
