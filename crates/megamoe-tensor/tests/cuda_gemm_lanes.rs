//! Per-group grouped GEMMs (the dropless expert GEMMs, `set_group_gemms`): spread over 1
//! to 4 streams, forward, input gradient and accumulated weight gradient are bitwise the
//! same for every stream count (every lane picks the same cuBLAS algorithm); with bucketed
//! cuBLASLt algorithms (one per bucket of the row count, reused for every row count in the
//! bucket: two sets of group sizes in the same buckets) they match the CPU backend as
//! well. Fresh random inputs, in f32 (parity tolerances; f32 GEMMs never take cuBLASLt, so
//! bucketed == exact bitwise) and in bf16-activation mode (bf16 tolerance), with empty
//! groups, a dominant group, rows outside every group and a NaN-poisoned output for the
//! overwriting form. Its own test binary: the settings and the bf16 mode are process-wide,
//! so everything runs in one test, one after the other.
//! Needs feature `cuda` and an NVIDIA GPU (`#[ignore]`d: run the test binary with
//! `--ignored` there).
#![cfg(feature = "cuda")]
#![allow(clippy::unwrap_used)]

mod common;
use common::{bits, rel};
use megamoe_tensor::cuda::{cuda_backend, set_group_gemms};
use megamoe_tensor::{DType, Device, RowGroups, Tensor};

const GPU: Device = Device::Cuda(0);

fn randn(seed: u64, shape: &[usize], std: f32) -> Tensor {
    Tensor::randn_named(seed, "x", shape.to_vec(), std, Device::Cpu).unwrap()
}

/// (forward `x·W_gᵀ`, input gradient `dy·W_g`, weight gradient accumulated onto `g0`) of
/// `groups`, bucketed or with `streams` GEMM streams (`(bucketed, streams)`).
fn products(
    (bucketed, streams): (bool, usize),
    (x, dy, w, g0): (&Tensor, &Tensor, &Tensor, &Tensor),
    groups: &RowGroups,
) -> (Tensor, Tensor, Tensor) {
    set_group_gemms(bucketed, streams).unwrap();
    let y = x.grouped_matmul(groups, w, true).unwrap();
    let dx = dy.grouped_matmul(groups, w, false).unwrap();
    let mut g = g0.clone();
    g.grouped_matmul_wgrad_acc(dy, x, groups, 1.0).unwrap();
    // an overwriting accumulate into a NaN-poisoned buffer: every group row is written
    let mut y0 = Tensor::full([x.dims()[0], w.dims()[1]], f32::NAN, DType::F32, x.device())
        .unwrap()
        .to_dtype(y.dtype())
        .unwrap();
    y0.grouped_matmul_acc(x, groups, w, true, 0.0).unwrap();
    let covered: usize = groups.sizes().to_host_i32().unwrap().iter().sum::<i32>() as usize;
    let n = w.dims()[1];
    let (acc, fwd) = (bits(&y0), bits(&y));
    assert!(
        acc[..covered * n]
            .iter()
            .all(|&b| f32::from_bits(b).is_finite()),
        "{streams} streams: a group row of the overwriting accumulate was not written"
    );
    assert_eq!(
        acc[..covered * n],
        fwd[..covered * n],
        "{streams} streams: accumulate with beta 0 == forward"
    );
    (y, dx, g)
}

/// Fresh `[rows, h]` / `[rows, n]` inputs, zero outside the groups of `sizes`.
fn inputs(seed: u64, sizes: &[usize], (h, n): (usize, usize)) -> (Tensor, Tensor) {
    let covered: usize = sizes.iter().sum();
    let rows = covered + 20;
    let mut xv = randn(seed, &[rows, h], 1.0).to_host_f32().unwrap();
    let mut dyv = randn(seed + 1, &[rows, n], 1.0).to_host_f32().unwrap();
    // rows outside every group are zero in a MoE layer's buffers
    xv[covered * h..].fill(0.0);
    dyv[covered * n..].fill(0.0);
    (
        Tensor::from_vec_f32(xv, [rows, h], Device::Cpu).unwrap(),
        Tensor::from_vec_f32(dyv, [rows, n], Device::Cpu).unwrap(),
    )
}

fn check_mode(bf16: bool) {
    let backend = cuda_backend(0).unwrap();
    backend.set_bf16_matmul(bf16);
    backend.set_bf16_activations(bf16);
    let tol = if bf16 { 1e-2 } else { 1e-5 };
    let (h, n) = (96, 80);
    let act = if bf16 { DType::BF16 } else { DType::F32 };
    let on_gpu = |t: &Tensor| t.to_device(GPU).unwrap();
    // 9 groups: empty ones, a dominant one and small ones (one GEMM per group: the skew
    // keeps the per-group plan); the second set has other sizes in the same buckets
    let sets: [[usize; 9]; 2] = [
        [0, 300, 5, 0, 77, 1, 150, 64, 0],
        [0, 290, 7, 0, 73, 2, 145, 60, 0],
    ];
    for (si, sizes) in sets.iter().enumerate() {
        let (x, dy) = inputs(31 + 10 * si as u64, sizes, (h, n));
        let w = randn(33 + 10 * si as u64, &[sizes.len(), n, h], 0.1);
        let g0 = randn(34 + 10 * si as u64, &[sizes.len(), n, h], 1.0);
        let cpu_groups = RowGroups::from_sizes(sizes, Device::Cpu).unwrap();
        let gpu_groups = RowGroups::from_sizes(sizes, GPU).unwrap();
        let (xg, dyg) = (
            on_gpu(&x).to_dtype(act).unwrap(),
            on_gpu(&dy).to_dtype(act).unwrap(),
        );
        let (wg, g0g) = (on_gpu(&w), on_gpu(&g0));
        let want = products((false, 1), (&x, &dy, &w, &g0), &cpu_groups);
        let one = products((false, 1), (&xg, &dyg, &wg, &g0g), &gpu_groups);
        let bucketed = products((true, 1), (&xg, &dyg, &wg, &g0g), &gpu_groups);
        for (mode, got) in [("exact", &one), ("bucketed", &bucketed)] {
            for (name, got, want) in [
                ("forward", &got.0, &want.0),
                ("input gradient", &got.1, &want.1),
                ("weight gradient", &got.2, &want.2),
            ] {
                let r = rel(got, want);
                eprintln!("  bf16 {bf16}, sizes {si}, {mode}: {name} rel {r:.1e} vs the CPU");
                assert!(
                    r.is_finite() && r <= tol,
                    "bf16 {bf16} {mode}: {name} rel {r:e}"
                );
            }
        }
        if !bf16 {
            // f32 GEMMs never take cuBLASLt: the bucketed setting changes nothing
            assert_eq!(bits(&bucketed.2), bits(&one.2), "f32 bucketed == exact");
        }
        for streams in 2..=4 {
            let many = products((false, streams), (&xg, &dyg, &wg, &g0g), &gpu_groups);
            assert_eq!(bits(&many.0), bits(&one.0), "{streams} streams: forward");
            assert_eq!(bits(&many.1), bits(&one.1), "{streams} streams: input grad");
            assert_eq!(
                bits(&many.2),
                bits(&one.2),
                "{streams} streams: weight grad"
            );
        }
        // the empty groups' weight gradients are their old values, bitwise
        let g0h = g0.to_host_f32().unwrap();
        for got in [&one.2, &bucketed.2] {
            let gh = got.to_host_f32().unwrap();
            for (g, _) in sizes.iter().enumerate().filter(|(_, &s)| s == 0) {
                let block = g * n * h..(g + 1) * n * h;
                assert_eq!(gh[block.clone()], g0h[block], "empty group {g}");
            }
        }
    }
    assert!(set_group_gemms(false, 0).is_err() && set_group_gemms(true, 5).is_err());
}

#[test]
#[ignore = "needs an NVIDIA GPU: run the test binary with --ignored there"]
fn per_group_gemms_exact_on_1_to_4_streams_and_bucketed_match_the_cpu() {
    check_mode(false);
    check_mode(true);
}
