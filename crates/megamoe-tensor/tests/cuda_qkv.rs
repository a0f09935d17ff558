//! The fused q|k|v path on the GPU in bf16 mode: the stacked projection
//! (`matmul_stacked`, its input and weight gradients) as one GEMM — over the joint bf16
//! weight copies and the adjacent gradients of a flat write-through buffer — and as one
//! GEMM per weight (`set_joint_projections(false)`) agree with the CPU's f32 products
//! within the bf16 tolerance and are each bitwise repeatable; RoPE on the leading heads
//! in place and cuDNN attention reading q, k, v out of the fused rows (and writing one
//! `d_qkv`) give the bits (RoPE) or values (attention) of the separate tensors. Its own
//! test binary (the modes are process-wide). Needs feature `cuda` and an NVIDIA GPU
//! (`#[ignore]`d: run the test binary with `--ignored` there).
#![cfg(feature = "cuda")]
#![allow(clippy::unwrap_used)]

mod common;
use common::{bits, gpu, randn, rel, GPU};
use megamoe_tensor::{DType, Device, Tensor, WeightCopies};

/// bf16 operands and bf16 storage of the result (GPU.md: 1e-3 to 1e-2).
const BF16_TOL: f64 = 1e-2;

fn cpu(t: &Tensor) -> Tensor {
    t.to_device(Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
}

#[test]
#[ignore = "needs an NVIDIA GPU: run the test binary with --ignored there"]
fn stacked_projection_one_gemm_and_per_weight_agree_and_repeat() {
    let backend = megamoe_tensor::cuda::cuda_backend(0).unwrap();
    backend.set_bf16_matmul(true);
    backend.set_bf16_activations(true);
    // x [128, 256]; q [256, 256], k, v [128, 256] (4 query / 2 KV heads of 64)
    let x = gpu(&randn(1, &[128, 256], 1.0))
        .to_dtype(DType::BF16)
        .unwrap();
    let d_y = gpu(&randn(2, &[128, 512], 1.0))
        .to_dtype(DType::BF16)
        .unwrap();
    let w: Vec<Tensor> = [(3, 256), (4, 128), (5, 128)]
        .iter()
        .map(|&(s, r)| gpu(&randn(s, &[r, 256], 0.05)))
        .collect();
    let ws: Vec<&Tensor> = w.iter().collect();
    let (xc, dyc) = (cpu(&x), cpu(&d_y));
    let wc: Vec<Tensor> = w.iter().map(cpu).collect();
    let wcs: Vec<&Tensor> = wc.iter().collect();
    let y_ref = xc.matmul_stacked(&wcs).unwrap();
    let dx_ref = dyc.matmul_stacked_input_grad(&wcs).unwrap();
    let mut g_ref: Vec<Tensor> = w
        .iter()
        .map(|t| Tensor::zeros(t.dims(), DType::F32, Device::Cpu).unwrap())
        .collect();
    {
        let mut gr: Vec<&mut Tensor> = g_ref.iter_mut().collect();
        Tensor::matmul_stacked_wgrad_acc(&mut gr, &dyc, &xc).unwrap();
    }

    // The flat gradients: q, k, v back to back, zeroing deferred.
    // SAFETY: this test's thread alone uses the buffer.
    let flat = unsafe { Tensor::write_through_zeros([(256 + 128 + 128) * 256], GPU).unwrap() };
    let mut outs = Vec::new();
    for joint in [true, false, true] {
        backend.set_joint_projections(joint);
        let before = backend.weight_copy_stats();
        let _g = WeightCopies::begin(GPU, &w).unwrap();
        let y = x.matmul_stacked(&ws).unwrap();
        let dx = d_y.matmul_stacked_input_grad(&ws).unwrap();
        let mut g = [
            flat.view(0, [256, 256]).unwrap(),
            flat.view(256 * 256, [128, 256]).unwrap(),
            flat.view(384 * 256, [128, 256]).unwrap(),
        ];
        flat.defer_zero(g.iter().map(|t| t.layout().range()))
            .unwrap();
        {
            let mut gm: Vec<&mut Tensor> = g.iter_mut().collect();
            Tensor::matmul_stacked_wgrad_acc(&mut gm, &d_y, &x).unwrap();
        }
        let after = backend.weight_copy_stats();
        assert_eq!(
            after.joint > before.joint,
            joint,
            "joint copies used iff joint"
        );
        assert_eq!(y.dtype(), DType::BF16);
        assert!(rel(&cpu(&y), &y_ref) < BF16_TOL, "y joint={joint}");
        assert!(rel(&cpu(&dx), &dx_ref) < BF16_TOL, "dx joint={joint}");
        for (gi, gr) in g.iter().zip(&g_ref) {
            assert_eq!(gi.dtype(), DType::F32);
            assert!(rel(&cpu(gi), gr) < BF16_TOL, "wgrad joint={joint}");
        }
        // accumulating again (no deferred zeros left): twice the gradient
        let once: Vec<Vec<u32>> = g.iter().map(bits).collect();
        {
            let mut gm: Vec<&mut Tensor> = g.iter_mut().collect();
            Tensor::matmul_stacked_wgrad_acc(&mut gm, &d_y, &x).unwrap();
        }
        for (gi, gr) in g.iter().zip(&g_ref) {
            let twice = gr.affine(2.0, 0.0).unwrap();
            assert!(rel(&cpu(gi), &twice) < BF16_TOL, "wgrad += joint={joint}");
        }
        outs.push((bits(&y), bits(&dx), once));
    }
    // each path bitwise repeatable (runs 0 and 2 are both joint)
    assert_eq!(outs[0], outs[2], "the joint path repeats bit for bit");
    // without weight copies the casts are stacked: the same one GEMM, the same bits
    backend.set_weight_copies(false);
    let y = x.matmul_stacked(&ws).unwrap();
    let dx = d_y.matmul_stacked_input_grad(&ws).unwrap();
    backend.set_weight_copies(true);
    assert_eq!(
        (bits(&y), bits(&dx)),
        (outs[0].0.clone(), outs[0].1.clone())
    );
    // the weights' copies kept their joint buffer from one registration to the next
    assert!(backend.weight_copy_stats().joint >= 2);
    backend.set_joint_projections(true);
}

#[test]
#[ignore = "needs an NVIDIA GPU: run the test binary with --ignored there"]
fn fused_qkv_rope_and_attention_match_the_separate_tensors() {
    let backend = megamoe_tensor::cuda::cuda_backend(0).unwrap();
    backend.set_bf16_matmul(true);
    backend.set_bf16_activations(true);
    // B 2, T 64, 4 query heads over 2 KV heads of 64: qkv [2, 64, 8, 64]
    let qkv0 = gpu(&randn(7, &[2, 64, 8, 64], 1.0))
        .to_dtype(DType::BF16)
        .unwrap();
    let d_o = gpu(&randn(8, &[2, 64, 4, 64], 1.0))
        .to_dtype(DType::BF16)
        .unwrap();
    let split = |t: &Tensor| {
        (
            t.narrow(2, 0, 4).unwrap(),
            t.narrow(2, 4, 2).unwrap(),
            t.narrow(2, 6, 2).unwrap(),
        )
    };
    let mut qkv = qkv0.deep_copy().unwrap();
    qkv.rope_leading_in_place(1e4, 6, false).unwrap();
    let (q0, k0, v0) = split(&qkv0);
    let (q, k, v) = (q0.rope(1e4).unwrap(), k0.rope(1e4).unwrap(), v0);
    let (qs, ks, vs) = split(&qkv);
    assert_eq!(bits(&qs), bits(&q), "rope of the q heads");
    assert_eq!(bits(&ks), bits(&k), "rope of the k heads");
    assert_eq!(bits(&vs), bits(&v), "v heads untouched");

    let (o_ref, lse_ref) = Tensor::causal_attention_bshd(&q, &k, &v, 0.125).unwrap();
    let (dq, dk, dv) =
        Tensor::causal_attention_bshd_backward(&q, &k, &v, &o_ref, &lse_ref, &d_o, 0.125).unwrap();
    let mut runs = Vec::new();
    for _ in 0..2 {
        let (o, lse) = Tensor::causal_attention_qkv(&qkv, 4, 2, 0.125).unwrap();
        assert!(rel(&cpu(&o), &cpu(&o_ref)) < BF16_TOL, "o");
        assert!(rel(&cpu(&lse), &cpu(&lse_ref)) < 1e-5, "lse");
        let mut d_qkv =
            Tensor::causal_attention_qkv_backward(&qkv, (&o, &lse, &d_o), 4, 2, 0.125).unwrap();
        assert_eq!(d_qkv.dims(), qkv.dims());
        let (gq, gk, gv) = split(&d_qkv);
        assert!(rel(&cpu(&gq), &cpu(&dq)) < BF16_TOL, "dq");
        assert!(rel(&cpu(&gk), &cpu(&dk)) < BF16_TOL, "dk");
        assert!(rel(&cpu(&gv), &cpu(&dv)) < BF16_TOL, "dv");
        d_qkv.rope_leading_in_place(1e4, 6, true).unwrap();
        let (rq, _, _) = split(&d_qkv);
        assert_eq!(bits(&rq), bits(&gq.rope_backward(1e4).unwrap()), "rope bwd");
        runs.push((bits(&o), bits(&d_qkv)));
    }
    assert_eq!(runs[0], runs[1], "fused attention repeats bit for bit");
    println!("attention: {}", backend.attention_status().unwrap());
}
