//! Matrix products against plain f64 loops; determinism across thread counts.

#![allow(clippy::unwrap_used)] // tests may unwrap (COMMON.md)

#[macro_use]
mod common;
use common::*;
use megamoe_tensor::{DType, Device, Error, RowGroups, Tensor};

/// Packed row groups from host sizes, on `dev` (the backend under test).
fn groups(dev: Device, sizes: &[usize]) -> RowGroups {
    RowGroups::from_sizes(sizes, dev).unwrap()
}

/// Naive f64 `op(a) op(b)`; a stored [m,k] or [k,m] (ta), b stored [k,n] or [n,k] (tb).
fn naive(a: &[f32], b: &[f32], m: usize, n: usize, k: usize, ta: bool, tb: bool) -> Vec<f64> {
    let mut out = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut s = 0.0f64;
            for l in 0..k {
                let av = if ta { a[l * m + i] } else { a[i * k + l] };
                let bv = if tb { b[j * k + l] } else { b[l * n + j] };
                s += av as f64 * bv as f64;
            }
            out[i * n + j] = s;
        }
    }
    out
}

// f32 GEMM vs f64 reference: each output sums k products of values in [-1,1); the f32
// rounding error is bounded by ~k·ε·Σ|a||b| ≤ k²·6e-8, so atol 1e-4 for k ≤ 40 is safe.
const RTOL: f64 = 1e-5;
const ATOL: f64 = 1e-4;

fn matmul_all_transposes_match_naive(dev: Device) {
    let (m, n, k) = (7, 5, 9);
    for &(ta, tb) in &[(false, false), (true, false), (false, true), (true, true)] {
        let a = rand_vec(1, m * k);
        let b = rand_vec(2, k * n);
        let at = Tensor::from_slice(&a, if ta { [k, m] } else { [m, k] }, dev).unwrap();
        let bt = Tensor::from_slice(&b, if tb { [n, k] } else { [k, n] }, dev).unwrap();
        let y = at.matmul(&bt, ta, tb).unwrap();
        assert_eq!(y.dims(), &[m, n]);
        assert_close(&host(&y), &naive(&a, &b, m, n, k, ta, tb), RTOL, ATOL);
    }
}

fn matmul_inner_dim_mismatch_is_typed_error(dev: Device) {
    let a = rand_on(dev, 1, &[3, 4]);
    let b = rand_on(dev, 2, &[5, 2]);
    assert!(matches!(
        a.matmul(&b, false, false),
        Err(Error::ShapeMismatch { op: "matmul", .. })
    ));
    let c = rand_on(dev, 3, &[2, 3, 4]);
    assert!(matches!(
        c.matmul(&b, false, false),
        Err(Error::RankMismatch { .. })
    ));
}

fn matmul_acc_accumulates_and_overwrites(dev: Device) {
    let a = rand_vec(3, 6 * 4);
    let b = rand_vec(4, 4 * 5);
    let at = Tensor::from_slice(&a, [6, 4], dev).unwrap();
    let bt = Tensor::from_slice(&b, [4, 5], dev).unwrap();
    let base = rand_vec(5, 30);
    let mut out = Tensor::from_slice(&base, [6, 5], dev).unwrap();
    let shared = out.clone();
    out.matmul_acc(&at, &bt, false, false, 0.5).unwrap();
    let prod = naive(&a, &b, 6, 5, 4, false, false);
    let want: Vec<f64> = prod
        .iter()
        .zip(&base)
        .map(|(p, &c)| p + 0.5 * c as f64)
        .collect();
    assert_close(&host(&out), &want, RTOL, ATOL);
    // copy-on-write: the other handle is unchanged
    assert_eq!(host(&shared), base);
    // beta = 0 ignores NaNs already in out
    let mut nan = Tensor::full([6, 5], f32::NAN, megamoe_tensor::DType::F32, dev).unwrap();
    nan.matmul_acc(&at, &bt, false, false, 0.0).unwrap();
    assert_close(&host(&nan), &prod, RTOL, ATOL);
}

fn bmm_matches_per_batch_naive_for_batched_and_shared_b(dev: Device) {
    let (bsz, m, n, k) = (5, 4, 3, 6);
    let a = rand_vec(6, bsz * m * k);
    let b = rand_vec(7, bsz * n * k);
    let at = Tensor::from_slice(&a, [bsz, m, k], dev).unwrap();
    let bt = Tensor::from_slice(&b, [bsz, n, k], dev).unwrap();
    let y = host(&at.bmm(&bt, false, true).unwrap());
    for i in 0..bsz {
        let want = naive(&a[i * m * k..], &b[i * n * k..], m, n, k, false, true);
        assert_close(&y[i * m * n..(i + 1) * m * n], &want, RTOL, ATOL);
    }
    let b2 = Tensor::from_slice(&b[..k * n], [k, n], dev).unwrap();
    let y2 = host(&at.bmm(&b2, false, false).unwrap());
    for i in 0..bsz {
        let want = naive(&a[i * m * k..], &b[..k * n], m, n, k, false, false);
        assert_close(&y2[i * m * n..(i + 1) * m * n], &want, RTOL, ATOL);
    }
}

fn grouped_matmul_matches_per_group_naive_with_empty_groups(dev: Device) {
    let (k, n) = (6, 5);
    let sizes = [3usize, 0, 130, 1, 0];
    let r: usize = sizes.iter().sum();
    let x = rand_vec(8, r * k);
    let w = rand_vec(9, sizes.len() * n * k);
    let xt = Tensor::from_slice(&x, [r, k], dev).unwrap();
    for trans in [true, false] {
        let shape = if trans {
            [sizes.len(), n, k]
        } else {
            [sizes.len(), k, n]
        };
        let wt = Tensor::from_slice(&w, shape, dev).unwrap();
        let y = host(&xt.grouped_matmul(&groups(dev, &sizes), &wt, trans).unwrap());
        let mut row = 0;
        for (g, &s) in sizes.iter().enumerate() {
            let want = naive(
                &x[row * k..(row + s) * k],
                &w[g * n * k..],
                s,
                n,
                k,
                false,
                trans,
            );
            assert_close(&y[row * n..(row + s) * n], &want, RTOL, ATOL);
            row += s;
        }
    }
}

fn grouped_matmul_wgrad_matches_naive_and_zero_for_empty_group(dev: Device) {
    let (k, n) = (4, 131);
    let sizes = [5usize, 0, 7];
    let r: usize = sizes.iter().sum();
    let dy = rand_vec(10, r * n);
    let x = rand_vec(11, r * k);
    let dyt = Tensor::from_slice(&dy, [r, n], dev).unwrap();
    let xt = Tensor::from_slice(&x, [r, k], dev).unwrap();
    let dw = Tensor::grouped_matmul_wgrad(&dyt, &xt, &groups(dev, &sizes)).unwrap();
    assert_eq!(dw.dims(), &[3, n, k]);
    let dw = host(&dw);
    let mut row = 0;
    for (g, &s) in sizes.iter().enumerate() {
        // dw_g = dy_gᵀ x_g: a = dy_g stored [s, n] used transposed
        let want = naive(
            &dy[row * n..(row + s) * n],
            &x[row * k..(row + s) * k],
            n,
            k,
            s,
            true,
            false,
        );
        assert_close(&dw[g * n * k..(g + 1) * n * k], &want, RTOL, ATOL);
        row += s;
    }
    assert!(dw[n * k..2 * n * k].iter().all(|&v| v == 0.0));
}

fn grouped_matmul_bad_groups_are_typed_errors(dev: Device) {
    let x = rand_on(dev, 1, &[4, 3]);
    let w = rand_on(dev, 2, &[2, 5, 3]);
    // one group for two weight matrices
    assert!(matches!(
        x.grouped_matmul(&groups(dev, &[4]), &w, true),
        Err(Error::InvalidArgument {
            arg: "groups.len()",
            ..
        })
    ));
    // groups past the 4 rows of x
    assert!(matches!(
        x.grouped_matmul(&groups(dev, &[3, 2]), &w, true),
        Err(Error::InvalidArgument { arg: "groups", .. })
    ));
    // overlapping groups (sizes above the stride: checked on the device by the GPU's
    // strided-group kernels, reported at the next read)
    let sizes = Tensor::from_vec_i32(vec![2, 2], [2], dev).unwrap();
    let overlap = RowGroups::strided(&sizes, 1).unwrap();
    expect_bad_input(
        dev,
        &tensor_error(x.grouped_matmul(&overlap, &w, true)),
        |e| matches!(e, Error::InvalidArgument { arg: "groups", .. }),
        "grouped_matmul",
    );
    // a negative size
    let neg = Tensor::from_vec_i32(vec![-1, 2], [2], dev).unwrap();
    assert!(matches!(
        x.grouped_matmul(&RowGroups::packed(&neg).unwrap(), &w, true),
        Err(Error::InvalidArgument { arg: "groups", .. })
    ));
    assert!(x.grouped_matmul(&groups(dev, &[4, 0]), &w, true).is_ok());
}

/// Strided (static-capacity) groups give the packed groups' results: the same bits on the
/// CPU (one kernel for both); on a GPU within f32 rounding, since cuBLAS runs a strided
/// batch and a per-group GEMM with different kernels (summation order).
fn same_as_packed(dev: Device, got: &[f32], packed: &[f32]) -> bool {
    match dev {
        Device::Cpu => same_bits(got, packed),
        Device::Cuda(_) => {
            got.len() == packed.len()
                && got
                    .iter()
                    .zip(packed)
                    .all(|(a, b)| (a - b).abs() <= 1e-5 * (1.0 + b.abs()))
        }
    }
}

fn grouped_ops_on_strided_groups_match_packed_and_skip_pad_rows(dev: Device) {
    // A static-capacity buffer [G·C, k] with C = 4: group g at rows 4g.., sizes 3, 0, 4.
    let (k, n, c) = (5, 3, 4);
    let sizes = [3usize, 0, 4];
    let packed_rows: usize = sizes.iter().sum();
    let xp = rand_vec(50, packed_rows * k);
    let dyp = rand_vec(51, packed_rows * n);
    // Pad rows hold garbage that must not leak into any result.
    let mut xs = vec![9.0f32; sizes.len() * c * k];
    let mut dys = vec![9.0f32; sizes.len() * c * n];
    let mut src = 0;
    for (g, &s) in sizes.iter().enumerate() {
        xs[g * c * k..(g * c + s) * k].copy_from_slice(&xp[src * k..(src + s) * k]);
        dys[g * c * n..(g * c + s) * n].copy_from_slice(&dyp[src * n..(src + s) * n]);
        src += s;
    }
    let counts = Tensor::from_vec_i32(vec![3, 0, 4], [3], dev).unwrap();
    let strided = RowGroups::strided(&counts, c).unwrap();
    let w = rand_on(dev, 52, &[3, n, k]);
    let xst = Tensor::from_vec_f32(xs, [sizes.len() * c, k], dev).unwrap();
    let dyst = Tensor::from_vec_f32(dys, [sizes.len() * c, n], dev).unwrap();
    let xpt = Tensor::from_vec_f32(xp, [packed_rows, k], dev).unwrap();
    let dypt = Tensor::from_vec_f32(dyp, [packed_rows, n], dev).unwrap();

    let ys = host(&xst.grouped_matmul(&strided, &w, true).unwrap());
    let yp = host(&xpt.grouped_matmul(&groups(dev, &sizes), &w, true).unwrap());
    let mut src = 0;
    for (g, &s) in sizes.iter().enumerate() {
        let rows = &ys[g * c * n..(g + 1) * c * n];
        assert!(
            same_as_packed(dev, &rows[..s * n], &yp[src * n..(src + s) * n]),
            "group {g}"
        );
        assert!(
            rows[s * n..].iter().all(|&v| v == 0.0),
            "pad rows of group {g}"
        );
        src += s;
    }
    let dws = host(&Tensor::grouped_matmul_wgrad(&dyst, &xst, &strided).unwrap());
    let dwp = host(&Tensor::grouped_matmul_wgrad(&dypt, &xpt, &groups(dev, &sizes)).unwrap());
    assert!(same_as_packed(dev, &dws, &dwp));
    // beta·self on pad rows of the accumulating form
    let mut acc = Tensor::full([sizes.len() * c, n], 2.0, DType::F32, dev).unwrap();
    acc.grouped_matmul_acc(&xst, &strided, &w, true, 0.5)
        .unwrap();
    let acc = host(&acc);
    assert!(
        acc[3 * n..4 * n].iter().all(|&v| v == 1.0),
        "pad row scaled by beta"
    );
    assert!(
        acc[c * n..2 * c * n].iter().all(|&v| v == 1.0),
        "empty group scaled by beta"
    );
}

fn matmul_family_same_bits_for_1_and_3_threads(dev: Device) {
    // Large enough that gemm uses its threaded path (m·n·k ≫ 2^18).
    let a = rand_on(dev, 12, &[256, 192]);
    let b = rand_on(dev, 13, &[320, 192]);
    let x = rand_on(dev, 14, &[700, 192]);
    // groups of 300 rows take the threaded-GEMM path, 100 and 0 the parallel-groups path
    let w = rand_on(dev, 15, &[4, 96, 192]);
    let sizes = [300usize, 0, 100, 300];
    let run = || {
        let y = host(&a.matmul(&b, false, true).unwrap());
        let g = host(&x.grouped_matmul(&groups(dev, &sizes), &w, true).unwrap());
        let dy = x.narrow(1, 0, 96).unwrap();
        let dw = host(&Tensor::grouped_matmul_wgrad(&dy, &x, &groups(dev, &sizes)).unwrap());
        let bm = host(
            &a.reshape([2, 128, 192])
                .unwrap()
                .bmm(&b, false, true)
                .unwrap(),
        );
        (y, g, dw, bm)
    };
    let one = in_pool(1, run);
    let three = in_pool(3, run);
    assert!(same_bits(&one.0, &three.0), "matmul");
    assert!(same_bits(&one.1, &three.1), "grouped_matmul");
    assert!(same_bits(&one.2, &three.2), "grouped_matmul_wgrad");
    assert!(same_bits(&one.3, &three.3), "bmm");
}

/// The CPU grouped `x · W_gᵀ` runs gemm on an explicitly transposed weight where that packs
/// cheaper; it must give exactly the bits of the dense `matmul` on the stored layout, for
/// shapes on both sides of gemm's special paths (tiny products, one row, k ≤ 2), ragged
/// tile edges, and k past one reduction block (k > 512), overwriting and accumulating.
#[test]
fn grouped_matmul_same_bits_as_dense_matmul_per_group() {
    let dev = Device::Cpu;
    let cases: &[(&[usize], usize, usize)] = &[
        (&[3, 0, 130, 1, 2], 5, 6),
        (&[16, 17, 300], 16, 16),
        (&[128, 64, 5, 1], 1024, 256),
        (&[40, 9], 33, 700),
        (&[70, 2, 3], 100, 2),
        (&[257, 31], 7, 1030),
        (&[1, 1, 600], 1, 3),
    ];
    for (seed, &(sizes, n, k)) in cases.iter().enumerate() {
        let seed = 100 + 4 * seed as u64;
        let r: usize = sizes.iter().sum();
        let x = rand_on(dev, seed, &[r, k]);
        let w = rand_on(dev, seed + 1, &[sizes.len(), n, k]);
        let base = rand_on(dev, seed + 2, &[r, n]);
        let y = host(&x.grouped_matmul(&groups(dev, sizes), &w, true).unwrap());
        let mut acc = base.clone();
        acc.grouped_matmul_acc(&x, &groups(dev, sizes), &w, true, 0.5)
            .unwrap();
        let acc = host(&acc);
        let mut row = 0;
        for (g, &s) in sizes.iter().enumerate() {
            if s == 0 {
                continue;
            }
            let xg = x.narrow(0, row, s).unwrap();
            let wg = w.narrow(0, g, 1).unwrap().reshape([n, k]).unwrap();
            let want = host(&xg.matmul(&wg, false, true).unwrap());
            let rows = row * n..(row + s) * n;
            assert!(
                same_bits(&y[rows.clone()], &want),
                "{sizes:?} n={n} k={k} group {g}"
            );
            let mut want_acc = base.narrow(0, row, s).unwrap();
            want_acc.matmul_acc(&xg, &wg, false, true, 0.5).unwrap();
            assert!(
                same_bits(&acc[rows], &host(&want_acc)),
                "acc {sizes:?} n={n} k={k} group {g}"
            );
            row += s;
        }
    }
}

/// `base + beta · product` in f64 (`beta_base` multiplies `base`; `None` means overwrite).
fn plus_scaled(base: &[f32], beta_base: Option<f64>, prod: &[f64]) -> Vec<f64> {
    prod.iter()
        .zip(base)
        .map(|(p, &c)| p + beta_base.map_or(0.0, |b| b * c as f64))
        .collect()
}

fn grouped_matmul_acc_accumulates_overwrites_and_checks_shape(dev: Device) {
    let (k, n) = (6, 5);
    let sizes = [3usize, 0, 130, 1, 0];
    let r: usize = sizes.iter().sum();
    let x = rand_vec(30, r * k);
    let w = rand_vec(31, sizes.len() * n * k);
    let base = rand_vec(32, r * n);
    let xt = Tensor::from_slice(&x, [r, k], dev).unwrap();
    for trans in [true, false] {
        let shape = if trans {
            [sizes.len(), n, k]
        } else {
            [sizes.len(), k, n]
        };
        let wt = Tensor::from_slice(&w, shape, dev).unwrap();
        // independent reference: per-group naive product
        let mut prod = vec![0.0f64; r * n];
        let mut row = 0;
        for (g, &s) in sizes.iter().enumerate() {
            let p = naive(
                &x[row * k..(row + s) * k],
                &w[g * n * k..],
                s,
                n,
                k,
                false,
                trans,
            );
            prod[row * n..(row + s) * n].copy_from_slice(&p);
            row += s;
        }
        for beta in [1.0f32, 0.5] {
            let mut out = Tensor::from_slice(&base, [r, n], dev).unwrap();
            let shared = out.clone();
            out.grouped_matmul_acc(&xt, &groups(dev, &sizes), &wt, trans, beta)
                .unwrap();
            let want = plus_scaled(&base, Some(beta as f64), &prod);
            assert_close(&host(&out), &want, RTOL, ATOL);
            assert_eq!(host(&shared), base, "copy-on-write");
        }
        // beta = 0 overwrites without reading: NaNs in the buffer do not propagate.
        let mut nan = Tensor::full([r, n], f32::NAN, DType::F32, dev).unwrap();
        nan.grouped_matmul_acc(&xt, &groups(dev, &sizes), &wt, trans, 0.0)
            .unwrap();
        assert_close(&host(&nan), &prod, RTOL, ATOL);
        // wrong output shape: a typed error naming the op
        let mut bad = Tensor::zeros([r, n + 1], DType::F32, dev).unwrap();
        assert!(matches!(
            bad.grouped_matmul_acc(&xt, &groups(dev, &sizes), &wt, trans, 1.0),
            Err(Error::ShapeMismatch {
                op: "grouped_matmul_acc",
                ..
            })
        ));
    }
}

fn grouped_matmul_wgrad_acc_accumulates_and_handles_empty_groups(dev: Device) {
    let (k, n) = (4, 131);
    let sizes = [5usize, 0, 7];
    let r: usize = sizes.iter().sum();
    let dy = rand_vec(33, r * n);
    let x = rand_vec(34, r * k);
    let base = rand_vec(35, sizes.len() * n * k);
    let dyt = Tensor::from_slice(&dy, [r, n], dev).unwrap();
    let xt = Tensor::from_slice(&x, [r, k], dev).unwrap();
    // independent reference: dw_g = dy_gᵀ x_g per group (zero for the empty group)
    let mut prod = vec![0.0f64; sizes.len() * n * k];
    let mut row = 0;
    for (g, &s) in sizes.iter().enumerate() {
        let p = naive(
            &dy[row * n..(row + s) * n],
            &x[row * k..(row + s) * k],
            n,
            k,
            s,
            true,
            false,
        );
        prod[g * n * k..(g + 1) * n * k].copy_from_slice(&p);
        row += s;
    }
    for beta in [1.0f32, 0.25] {
        let mut g = Tensor::from_slice(&base, [3, n, k], dev).unwrap();
        let shared = g.clone();
        g.grouped_matmul_wgrad_acc(&dyt, &xt, &groups(dev, &sizes), beta)
            .unwrap();
        let got = host(&g);
        assert_close(
            &got,
            &plus_scaled(&base, Some(beta as f64), &prod),
            RTOL,
            ATOL,
        );
        assert_eq!(host(&shared), base, "copy-on-write");
        if beta == 1.0 {
            // the empty group adds nothing: its block keeps the old values exactly
            assert!(same_bits(&got[n * k..2 * n * k], &base[n * k..2 * n * k]));
        }
    }
    // beta = 0: overwrite without reading; the empty group's block becomes exactly zero.
    let mut nan = Tensor::full([3, n, k], f32::NAN, DType::F32, dev).unwrap();
    nan.grouped_matmul_wgrad_acc(&dyt, &xt, &groups(dev, &sizes), 0.0)
        .unwrap();
    let got = host(&nan);
    assert_close(&got, &prod, RTOL, ATOL);
    assert!(got[n * k..2 * n * k].iter().all(|&v| v == 0.0));
    let mut bad = Tensor::zeros([2, n, k], DType::F32, dev).unwrap();
    assert!(matches!(
        bad.grouped_matmul_wgrad_acc(&dyt, &xt, &groups(dev, &sizes), 1.0),
        Err(Error::ShapeMismatch {
            op: "grouped_matmul_wgrad_acc",
            ..
        })
    ));
}

fn grouped_acc_ops_same_bits_for_1_2_and_3_threads(dev: Device) {
    // Few groups (3 threads: the threaded-GEMM path for the 300-row groups) and many groups
    // (every thread count: whole groups in parallel); both paths must give the same bits.
    let x = rand_on(dev, 40, &[1100, 192]);
    let dy = rand_on(dev, 41, &[1100, 96]);
    let cases: [&[usize]; 2] = [
        &[300, 0, 100, 300, 400],
        &[300, 20, 100, 300, 0, 80, 50, 250],
    ];
    for sizes in cases {
        let r: usize = sizes.iter().sum();
        let (xs, dys) = (x.narrow(0, 0, r).unwrap(), dy.narrow(0, 0, r).unwrap());
        let w = rand_on(dev, 42, &[sizes.len(), 96, 192]);
        let run = || {
            let mut y = rand_on(dev, 43, &[r, 96]);
            y.grouped_matmul_acc(&xs, &groups(dev, sizes), &w, true, 1.0)
                .unwrap();
            let mut dw = rand_on(dev, 44, &[sizes.len(), 96, 192]);
            dw.grouped_matmul_wgrad_acc(&dys, &xs, &groups(dev, sizes), 1.0)
                .unwrap();
            (host(&y), host(&dw))
        };
        let one = in_pool(1, run);
        for threads in [2, 3] {
            let other = in_pool(threads, run);
            assert!(same_bits(&one.0, &other.0), "grouped_matmul_acc {sizes:?}");
            assert!(
                same_bits(&one.1, &other.1),
                "grouped_matmul_wgrad_acc {sizes:?}"
            );
        }
    }
}

/// Per-group naive `x_g · op(w_g)` over packed `sizes` (rows past the groups stay 0).
fn grouped_naive(
    x: &[f32],
    w: &[f32],
    sizes: &[usize],
    (r, n, k): (usize, usize, usize),
    trans: bool,
) -> Vec<f64> {
    let mut prod = vec![0.0f64; r * n];
    let mut row = 0;
    for (g, &s) in sizes.iter().enumerate() {
        let p = naive(
            &x[row * k..(row + s) * k],
            &w[g * n * k..],
            s,
            n,
            k,
            false,
            trans,
        );
        prod[row * n..(row + s) * n].copy_from_slice(&p);
        row += s;
    }
    prod
}

fn grouped_ops_on_balanced_and_equal_packed_groups_match_naive(dev: Device) {
    // Balanced groups with an empty one and rows past the groups (the CUDA backend pads them
    // to one size and runs one strided-batched GEMM), and equal groups covering every row
    // (one strided-batched GEMM in place): the same products as per-group loops.
    let (k, n) = (24, 20);
    let cases: [(&[usize], usize); 2] = [(&[40, 37, 0, 44, 41], 3), (&[32, 32, 32], 0)];
    for (sizes, extra) in cases {
        let total: usize = sizes.iter().sum();
        let (r, gn) = (total + extra, sizes.len());
        let x = rand_vec(50, r * k);
        let w = rand_vec(51, gn * n * k);
        let xt = Tensor::from_slice(&x, [r, k], dev).unwrap();
        let gs = groups(dev, sizes);
        for trans in [true, false] {
            let shape = if trans { [gn, n, k] } else { [gn, k, n] };
            let wt = Tensor::from_slice(&w, shape, dev).unwrap();
            let prod = grouped_naive(&x, &w, sizes, (r, n, k), trans);
            let y = host(&xt.grouped_matmul(&gs, &wt, trans).unwrap());
            assert_close(&y, &prod, RTOL, ATOL);
            assert!(
                y[total * n..].iter().all(|&v| v == 0.0),
                "rows past the groups"
            );
            if extra == 0 {
                let base = rand_vec(52, r * n);
                let mut out = Tensor::from_slice(&base, [r, n], dev).unwrap();
                out.grouped_matmul_acc(&xt, &gs, &wt, trans, 0.5).unwrap();
                assert_close(
                    &host(&out),
                    &plus_scaled(&base, Some(0.5), &prod),
                    RTOL,
                    ATOL,
                );
                let mut nan = Tensor::full([r, n], f32::NAN, DType::F32, dev).unwrap();
                nan.grouped_matmul_acc(&xt, &gs, &wt, trans, 0.0).unwrap();
                assert_close(&host(&nan), &prod, RTOL, ATOL);
            }
        }
        // weight gradient: dw_g = dy_gᵀ x_g (the empty group's block exactly zero or kept)
        let dy = rand_vec(53, r * n);
        let dyt = Tensor::from_slice(&dy, [r, n], dev).unwrap();
        let mut want = vec![0.0f64; gn * n * k];
        let mut row = 0;
        for (g, &s) in sizes.iter().enumerate() {
            let p = naive(
                &dy[row * n..(row + s) * n],
                &x[row * k..(row + s) * k],
                n,
                k,
                s,
                true,
                false,
            );
            want[g * n * k..(g + 1) * n * k].copy_from_slice(&p);
            row += s;
        }
        let mut nan = Tensor::full([gn, n, k], f32::NAN, DType::F32, dev).unwrap();
        nan.grouped_matmul_wgrad_acc(&dyt, &xt, &gs, 0.0).unwrap();
        assert_close(&host(&nan), &want, RTOL, ATOL);
        let base = rand_vec(54, gn * n * k);
        let mut acc = Tensor::from_slice(&base, [gn, n, k], dev).unwrap();
        acc.grouped_matmul_wgrad_acc(&dyt, &xt, &gs, 1.0).unwrap();
        let got = host(&acc);
        assert_close(&got, &plus_scaled(&base, Some(1.0), &want), RTOL, ATOL);
        for (g, &s) in sizes.iter().enumerate() {
            if s == 0 {
                let b = g * n * k..(g + 1) * n * k;
                assert!(same_bits(&got[b.clone()], &base[b]), "empty group {g} kept");
            }
        }
    }
}

backend_tests!(
    matmul_all_transposes_match_naive,
    matmul_inner_dim_mismatch_is_typed_error,
    matmul_acc_accumulates_and_overwrites,
    bmm_matches_per_batch_naive_for_batched_and_shared_b,
    grouped_matmul_matches_per_group_naive_with_empty_groups,
    grouped_matmul_wgrad_matches_naive_and_zero_for_empty_group,
    grouped_matmul_bad_groups_are_typed_errors,
    grouped_ops_on_strided_groups_match_packed_and_skip_pad_rows,
    matmul_family_same_bits_for_1_and_3_threads,
    grouped_matmul_acc_accumulates_overwrites_and_checks_shape,
    grouped_matmul_wgrad_acc_accumulates_and_handles_empty_groups,
    grouped_acc_ops_same_bits_for_1_2_and_3_threads,
    grouped_ops_on_balanced_and_equal_packed_groups_match_naive,
);

/// On the CPU a weight is its own GEMM operand (no copy): a fused operand joined from two
/// weights' operands is the fused weight (the GPU's bf16 case: `cuda_weight_copies`).
#[test]
fn cpu_weights_are_their_own_gemm_operands() {
    let w = rand_on(Device::Cpu, 21, &[6, 4]);
    let op = w.as_gemm_weight().unwrap();
    assert!(op.same_storage(&w) && op.dims() == w.dims() && op.dtype() == DType::F32);
}
