//! bf16 weight copies ([`WeightCopies`]) on the GPU in bf16 mode: a registered f32 weight
//! is cast once per registration and every matmul reading it (whole, reshaped, or an
//! expert's slice) gives the same bits as with a fresh cast; a weight written in place
//! while registered is copied first (the copy never goes stale); a replaced weight is not
//! served from the old copy; copies keep their addresses from one registration to the
//! next; write-through buffers are never registered. Its own test binary (the mode is
//! process-wide). Needs feature `cuda` and an NVIDIA GPU (`#[ignore]`d: run the test
//! binary with `--ignored` there).
#![cfg(feature = "cuda")]
#![allow(clippy::unwrap_used)]

mod common;
use common::bits;
use megamoe_tensor::cuda::device_address;
use megamoe_tensor::{DType, Device, Tensor, WeightCopies};

const GPU: Device = Device::Cuda(0);

fn randn(seed: u64, shape: &[usize], std: f32) -> Tensor {
    Tensor::randn_named(seed, "x", shape.to_vec(), std, Device::Cpu)
        .unwrap()
        .to_device(GPU)
        .unwrap()
}

#[test]
#[ignore = "needs an NVIDIA GPU: run the test binary with --ignored there"]
fn registered_weights_are_cast_once_and_give_the_same_bits() {
    let backend = megamoe_tensor::cuda::cuda_backend(0).unwrap();
    backend.set_bf16_matmul(true);
    backend.set_bf16_activations(true);
    let x = randn(1, &[64, 96], 1.0).to_dtype(DType::BF16).unwrap();
    let dy = randn(2, &[64, 80], 1.0).to_dtype(DType::BF16).unwrap();
    let w = randn(3, &[80, 96], 0.1);
    let bank = randn(4, &[4, 80, 96], 0.1);

    // Reference: no registration, every matmul casts its weight.
    let y_ref = x.matmul(&w, false, true).unwrap();
    let dx_ref = dy.matmul(&w, false, false).unwrap();
    let expert_ref = x
        .matmul(
            &bank.narrow(0, 2, 1).unwrap().reshape([80, 96]).unwrap(),
            false,
            true,
        )
        .unwrap();

    let before = backend.weight_copy_stats();
    let guard = WeightCopies::begin(GPU, &[w.clone(), bank.clone()]).unwrap();
    assert_eq!(backend.weight_copy_stats().registered, 2);
    let y = x.matmul(&w, false, true).unwrap();
    let dx = dy.matmul(&w, false, false).unwrap();
    let expert = x
        .matmul(
            &bank.narrow(0, 2, 1).unwrap().reshape([80, 96]).unwrap(),
            false,
            true,
        )
        .unwrap();
    let after = backend.weight_copy_stats();
    // w filled once and read once more; the bank filled once (for its expert 2 slice).
    assert_eq!(after.fills - before.fills, 2, "{before:?} -> {after:?}");
    assert_eq!(after.hits - before.hits, 1, "{before:?} -> {after:?}");
    assert_eq!(bits(&y), bits(&y_ref), "y");
    assert_eq!(bits(&dx), bits(&dx_ref), "dx");
    assert_eq!(bits(&expert), bits(&expert_ref), "expert slice");
    let addresses = backend.weight_copy_addresses();

    // Written in place while registered: the write copies (the registration holds the
    // buffer), so the new values are another buffer and no matmul reads the old copy.
    let mut w = w;
    let at = device_address(&w);
    let delta = randn(5, &[80, 96], 0.1);
    let w_new = w.add(&delta).unwrap();
    w.add_assign(&delta).unwrap();
    assert_ne!(
        device_address(&w),
        at,
        "in-place write on a registered weight"
    );
    let y2 = x.matmul(&w, false, true).unwrap();
    let y2_ref = x.matmul(&w_new, false, true).unwrap();
    assert_eq!(bits(&y2), bits(&y2_ref), "updated weight");
    assert_ne!(bits(&y2), bits(&y), "the update changes the product");
    drop(guard);
    assert_eq!(backend.weight_copy_stats().registered, 0);
    // Released: an in-place write on a weight that was registered is in place again.
    let mut bank = bank;
    let at = device_address(&bank);
    bank.add_assign(&randn(7, &[4, 80, 96], 0.1)).unwrap();
    assert_eq!(device_address(&bank), at, "in-place write after release");
    let w2 = w_new;

    // The next step: the replaced weight is registered, its copy filled again at the same
    // address (same size, same slot).
    let fills = backend.weight_copy_stats().fills;
    let _guard = WeightCopies::begin(GPU, &[w2.clone(), bank.clone()]).unwrap();
    let y3 = x.matmul(&w2, false, true).unwrap();
    let _ = x
        .matmul(
            &bank.narrow(0, 0, 1).unwrap().reshape([80, 96]).unwrap(),
            false,
            true,
        )
        .unwrap();
    assert_eq!(backend.weight_copy_stats().fills - fills, 2);
    assert_eq!(
        bits(&y3),
        bits(&y2_ref),
        "replaced weight after re-registration"
    );
    assert_eq!(
        backend.weight_copy_addresses()[..2],
        addresses[..2],
        "copies moved"
    );

    // A weight not registered is cast fresh: same bits as without copies.
    let hits = backend.weight_copy_stats().hits;
    let w_other = randn(3, &[80, 96], 0.1);
    assert_eq!(
        bits(&x.matmul(&w_other, false, true).unwrap()),
        bits(&y_ref)
    );
    assert_eq!(
        backend.weight_copy_stats().hits,
        hits,
        "unregistered weight served from a copy"
    );
}

#[test]
#[ignore = "needs an NVIDIA GPU: run the test binary with --ignored there"]
fn write_through_buffers_and_disabled_copies_register_nothing() {
    let backend = megamoe_tensor::cuda::cuda_backend(0).unwrap();
    backend.set_bf16_matmul(true);
    backend.set_bf16_activations(true);
    // SAFETY: this thread is the buffer's only user.
    let flat = unsafe { Tensor::write_through_zeros([80 * 96], GPU) }.unwrap();
    let w = randn(6, &[80, 96], 0.1);
    {
        let _g = WeightCopies::begin(GPU, &[flat.reshape([80, 96]).unwrap(), w.clone()]).unwrap();
        assert_eq!(
            backend.weight_copy_stats().registered,
            1,
            "write-through view registered"
        );
    }
    backend.set_weight_copies(false);
    {
        let _g = WeightCopies::begin(GPU, std::slice::from_ref(&w)).unwrap();
        assert_eq!(
            backend.weight_copy_stats().registered,
            0,
            "disabled copies registered"
        );
    }
    backend.set_weight_copies(true);
}

/// AdamW constants as the two nine-word device tensors of `segments_adamw`.
fn adamw_words(backend: &megamoe_tensor::cuda::CudaBackend) -> (Tensor, Tensor) {
    let words = |decay: bool| {
        let step = megamoe_tensor::AdamWStep {
            lr: 3e-3,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: if decay { 0.1 } else { 0.0 },
            t: 3,
        };
        let w = backend.adamw_device_words(&step).unwrap();
        Tensor::from_vec_i32(w.to_vec(), [9], GPU).unwrap()
    };
    (words(true), words(false))
}

#[test]
#[ignore = "needs an NVIDIA GPU: run the test binary with --ignored there"]
fn the_flat_adamw_launch_writes_the_copies_the_next_step_reads() {
    let backend = megamoe_tensor::cuda::cuda_backend(0).unwrap();
    backend.set_bf16_matmul(true);
    backend.set_bf16_activations(true);
    let x = randn(11, &[64, 96], 1.0).to_dtype(DType::BF16).unwrap();
    let mut ws = vec![randn(12, &[80, 96], 0.1), randn(13, &[80, 96], 0.1)];
    let grads = [randn(14, &[80, 96], 0.01), randn(15, &[80, 96], 0.01)];
    let mut moments: Vec<(Tensor, Tensor)> = (0..2)
        .map(|i| {
            let m = randn(16 + i, &[80, 96], 0.01);
            let v = randn(18 + i, &[80, 96], 0.01).square().unwrap();
            (m, v)
        })
        .collect();
    let (with, without) = adamw_words(backend);
    // One step: register, read (fills both copies), release, flat AdamW.
    let optimizer_step = |ws: &mut [Tensor], moments: &mut [(Tensor, Tensor)]| {
        let segs: Vec<_> = ws
            .iter_mut()
            .zip(moments.iter_mut())
            .zip(&grads)
            .map(|((w, (m, v)), g)| backend.adamw_segment(w, m, v, g, true).unwrap())
            .collect();
        let table = backend.optimizer_segments(&segs).unwrap();
        backend
            .segments_adamw(&table, (&with, &without), None, None)
            .unwrap();
    };
    // A product with a fresh cast of `w`'s current values (a deep copy is not registered).
    let fresh = |w: &Tensor| bits(&x.matmul(&w.deep_copy().unwrap(), false, true).unwrap());
    {
        let _g = WeightCopies::begin(GPU, &ws).unwrap();
        for w in &ws {
            let _ = x.matmul(w, false, true).unwrap();
        }
    }
    optimizer_step(&mut ws, &mut moments);

    // Next step: both copies were written by the launch; no cast, same bits as a cast.
    let before = backend.weight_copy_stats();
    {
        let _g = WeightCopies::begin(GPU, &ws).unwrap();
        let after = backend.weight_copy_stats();
        assert_eq!(after.written - before.written, 2, "{before:?} -> {after:?}");
        assert_eq!(backend.written_weight_copies().len(), 2);
        assert!(backend.written_copies_hold(&backend.written_weight_copies(), &ws));
        for w in &ws {
            assert_eq!(
                bits(&x.matmul(w, false, true).unwrap()),
                fresh(w),
                "copy bits"
            );
        }
        assert_eq!(
            backend.weight_copy_stats().fills,
            before.fills,
            "cast again"
        );
    }
    let marks = backend.written_weight_copies();
    optimizer_step(&mut ws, &mut moments);
    assert!(
        backend.written_copies_hold(&marks, &ws),
        "launch renews the marks"
    );

    // A weight written in place after the launch misses (cast again); the other hits.
    ws[1].add_assign(&randn(20, &[80, 96], 0.1)).unwrap();
    assert!(
        !backend.written_copies_hold(&marks, &ws),
        "written weight still held"
    );
    let before = backend.weight_copy_stats();
    {
        let _g = WeightCopies::begin(GPU, &ws).unwrap();
        for w in &ws {
            assert_eq!(
                bits(&x.matmul(w, false, true).unwrap()),
                fresh(w),
                "after write"
            );
        }
        let after = backend.weight_copy_stats();
        assert_eq!(after.written - before.written, 1, "{before:?} -> {after:?}");
        assert_eq!(after.fills - before.fills, 1, "{before:?} -> {after:?}");
    }

    // A replaced weight (another buffer, same values) is not served from the written copy.
    optimizer_step(&mut ws, &mut moments);
    ws[0] = ws[0].deep_copy().unwrap();
    let before = backend.weight_copy_stats();
    let _g = WeightCopies::begin(GPU, &ws).unwrap();
    assert_eq!(backend.weight_copy_stats().written - before.written, 1);
}

#[test]
#[ignore = "needs an NVIDIA GPU: run the test binary with --ignored there"]
fn a_fused_operand_of_two_registered_weights_reads_their_copies() {
    // The shared experts' gate‖up operand: joined from the two weights' GEMM operands
    // (their bf16 copies) instead of cast from a joined f32 copy — the same bits.
    let backend = megamoe_tensor::cuda::cuda_backend(0).unwrap();
    backend.set_bf16_matmul(true);
    backend.set_bf16_activations(true);
    let x = randn(11, &[64, 96], 1.0).to_dtype(DType::BF16).unwrap();
    let (gate, up) = (randn(12, &[40, 96], 0.1), randn(13, &[40, 96], 0.1));
    let want = x
        .matmul(&Tensor::cat(&[&gate, &up], 0).unwrap(), false, true)
        .unwrap();
    let unregistered = gate.as_gemm_weight().unwrap();
    assert_eq!(
        unregistered.dtype(),
        DType::BF16,
        "bf16-matmul mode reads bf16"
    );
    let _guard = WeightCopies::begin(GPU, &[gate.clone(), up.clone()]).unwrap();
    let fills = backend.weight_copy_stats().fills;
    let fused = Tensor::cat(
        &[
            &gate.as_gemm_weight().unwrap(),
            &up.as_gemm_weight().unwrap(),
        ],
        0,
    )
    .unwrap();
    assert_eq!(
        backend.weight_copy_stats().fills - fills,
        2,
        "one cast per weight"
    );
    assert_eq!(fused.dtype(), DType::BF16);
    assert_eq!(bits(&x.matmul(&fused, false, true).unwrap()), bits(&want));
    assert_eq!(bits(&unregistered), bits(&gate.as_gemm_weight().unwrap()));
}
