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

use megamoe_tensor::cuda::device_address;
use megamoe_tensor::{DType, Device, Tensor, WeightCopies};

const GPU: Device = Device::Cuda(0);

fn randn(seed: u64, shape: &[usize], std: f32) -> Tensor {
    Tensor::randn_named(seed, "x", shape.to_vec(), std, Device::Cpu)
        .unwrap()
        .to_device(GPU)
        .unwrap()
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.to_host_f32()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect()
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
