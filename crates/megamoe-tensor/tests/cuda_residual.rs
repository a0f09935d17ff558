//! The residual-sum ops on the GPU (`Tensor::matmul_add`, `Tensor::add_sum`) against the
//! CPU's unfused ops on fresh random inputs: in bf16-activation mode the fused forms
//! round once where the unfused ops round twice, so they agree with the f32 reference
//! within the bf16 tolerance and strictly closer than the unfused GPU ops; `add_sum` is
//! bit-exact against `a + (b + c)` in f32 rounded once. Its own test binary (the
//! activation mode is process-wide). Needs feature `cuda` and an NVIDIA GPU (`#[ignore]`d:
//! run the test binary with `--ignored` there).
#![cfg(feature = "cuda")]
#![allow(clippy::unwrap_used)]

mod common;
use common::{bits, rel};
use megamoe_tensor::{DType, Device, Tensor};

const GPU: Device = Device::Cuda(0);
const BF16_TOL: f64 = 1e-2;

fn randn(seed: u64, shape: &[usize], std: f32) -> Tensor {
    Tensor::randn_named(seed, "r", shape.to_vec(), std, Device::Cpu).unwrap()
}

/// A bf16 copy on the GPU (an activation as the previous op leaves it).
fn act(t: &Tensor) -> Tensor {
    t.to_device(GPU).unwrap().to_dtype(DType::BF16).unwrap()
}

/// `t` rounded to bf16 and back, on the CPU (the values the GPU holds).
fn rounded(t: &Tensor) -> Tensor {
    let v: Vec<f32> = t
        .to_host_f32()
        .unwrap()
        .iter()
        .map(|&x| half::bf16::from_f32(x).to_f32())
        .collect();
    Tensor::from_vec_f32(v, t.dims().to_vec(), Device::Cpu).unwrap()
}

fn mode(bf16: bool) {
    let backend = megamoe_tensor::cuda::cuda_backend(0).unwrap();
    backend.set_bf16_matmul(bf16);
    backend.set_bf16_activations(bf16);
}

#[test]
#[ignore = "needs an NVIDIA GPU: run the test binary with --ignored there"]
fn bf16_matmul_add_rounds_once_within_tolerance() {
    mode(true);
    // the o_proj shape of a block, small: x [N, H] + o [N, D] · W [H, D]ᵀ, and W stored
    // [D, H] (trans_b false); one shape cuBLASLt may align differently (H = 72)
    for (n, h, d, trans) in [
        (256, 128, 96, true),
        (256, 128, 96, false),
        (64, 72, 40, true),
    ] {
        let x = rounded(&randn(1, &[n, h], 1.0));
        let o = rounded(&randn(2, &[n, d], 1.0));
        let w_dims = if trans { [h, d] } else { [d, h] };
        let w = rounded(&randn(3, &w_dims, 0.2));
        let want = x.add(&o.matmul(&w, false, trans).unwrap()).unwrap();
        let (xg, og, wg) = (act(&x), act(&o), w.to_device(GPU).unwrap());
        let fused = xg.matmul_add(&og, &wg, trans).unwrap();
        let unfused = xg.add(&og.matmul(&wg, false, trans).unwrap()).unwrap();
        assert_eq!(fused.dtype(), DType::BF16);
        assert_eq!(fused.dims(), [n, h]);
        let (rf, ru) = (rel(&fused, &want), rel(&unfused, &want));
        eprintln!("  matmul_add {n}x{h}x{d} trans_b {trans}: fused rel {rf:.3e}, unfused {ru:.3e}");
        assert!(rf.is_finite() && rf <= BF16_TOL, "rel {rf:e}");
        // one rounding of the f32 sum instead of two: strictly closer over the whole tensor
        // (equal would mean the unfused fallback ran)
        assert!(rf < ru, "fused {rf:e} not closer than unfused {ru:e}");
    }
    // a residual that is not bf16 takes the unfused ops (same values as them)
    let (x, o, w) = (
        randn(4, &[32, 16], 1.0),
        randn(5, &[32, 8], 1.0),
        randn(6, &[16, 8], 0.2),
    );
    let xg = x.to_device(GPU).unwrap();
    let (og, wg) = (act(&o), w.to_device(GPU).unwrap());
    let got = xg.matmul_add(&og, &wg, true).unwrap();
    let unfused = xg.add(&og.matmul(&wg, false, true).unwrap()).unwrap();
    assert_eq!(bits(&got), bits(&unfused));
}

#[test]
#[ignore = "needs an NVIDIA GPU: run the test binary with --ignored there"]
fn bf16_add_sum_is_one_rounding_of_the_f32_sum_bitwise() {
    mode(true);
    // 8-element aligned (the one-pass kernel) and not (the two adds)
    for n in [4096usize * 3, 1001] {
        let (a, b, c) = (
            rounded(&randn(7, &[n], 4.0)),
            rounded(&randn(8, &[n], 1.0)),
            rounded(&randn(9, &[n], 1.0)),
        );
        let got = act(&a).add_sum(&act(&b), &act(&c)).unwrap();
        assert_eq!(got.dtype(), DType::BF16);
        let want = if n % 8 == 0 {
            rounded(&a.add(&b.add(&c).unwrap()).unwrap())
        } else {
            rounded(&a.add(&rounded(&b.add(&c).unwrap())).unwrap())
        };
        assert_eq!(bits(&got), bits(&want), "add_sum n = {n}");
        assert!(rel(&got, &want) == 0.0 && want.to_host_f32().unwrap().iter().any(|&v| v != 0.0));
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: run the test binary with --ignored there"]
fn f32_residual_ops_are_the_cpu_ops() {
    mode(false);
    let (a, b, c) = (
        randn(10, &[64, 48], 1.0),
        randn(11, &[64, 48], 1.0),
        randn(12, &[64, 48], 1.0),
    );
    let g = |t: &Tensor| t.to_device(GPU).unwrap();
    let got = g(&a).add_sum(&g(&b), &g(&c)).unwrap();
    assert_eq!(got.dtype(), DType::F32);
    assert_eq!(bits(&got), bits(&a.add_sum(&b, &c).unwrap()));
    let (o, w) = (randn(13, &[64, 24], 1.0), randn(14, &[48, 24], 0.2));
    let got = g(&a).matmul_add(&g(&o), &g(&w), true).unwrap();
    let r = rel(&got, &a.matmul_add(&o, &w, true).unwrap());
    eprintln!("  f32 matmul_add rel {r:.3e}");
    assert!(r <= 1e-5, "rel {r:e}");
}
