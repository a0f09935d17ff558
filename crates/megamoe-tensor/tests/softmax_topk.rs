//! Softmax family, reductions and top-k against plain loops.

#![allow(clippy::unwrap_used)] // tests may unwrap (COMMON.md)

#[macro_use]
mod common;
use common::*;
use megamoe_tensor::{Device, Error, Tensor};

fn softmax_ref(x: &[f32]) -> Vec<f64> {
    let m = x.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
    let e: Vec<f64> = x.iter().map(|&v| (v as f64 - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}

fn softmax_and_log_softmax_match_reference(dev: Device) {
    let (n, h) = (6, 11);
    let x: Vec<f32> = rand_vec(60, n * h).iter().map(|v| v * 8.0).collect();
    let t = Tensor::from_slice(&x, [2, 3, h], dev).unwrap();
    let want: Vec<f64> = x.chunks(h).flat_map(softmax_ref).collect();
    assert_close(&host(&t.softmax().unwrap()), &want, 1e-6, 1e-9);
    let want_log: Vec<f64> = want.iter().map(|v| v.ln()).collect();
    assert_close(&host(&t.log_softmax().unwrap()), &want_log, 1e-6, 1e-6);
}

/// FD check: L = Σ g ⊙ softmax(x); dL/dx from the f64 reference softmax.
fn softmax_backward_matches_finite_differences(dev: Device) {
    let h = 9;
    let x = rand_vec(61, h);
    let g = rand_vec(62, h);
    let loss = |x: &[f64]| -> f64 {
        let m = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = x.iter().map(|v| (v - m).exp()).collect();
        let s: f64 = e.iter().sum();
        e.iter().zip(&g).map(|(e, &g)| e / s * g as f64).sum()
    };
    let lsm = |x: &[f64]| -> f64 {
        let m = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + x.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
        x.iter().zip(&g).map(|(v, &g)| (v - lse) * g as f64).sum()
    };
    let x64 = to64(&x);
    let fd = |f: &dyn Fn(&[f64]) -> f64| -> Vec<f64> {
        (0..h)
            .map(|i| {
                let eps = 1e-5;
                let mut p = x64.clone();
                p[i] += eps;
                let mut m = x64.clone();
                m[i] -= eps;
                (f(&p) - f(&m)) / (2.0 * eps)
            })
            .collect()
    };
    let xt = Tensor::from_slice(&x, [1, h], dev).unwrap();
    let gt = Tensor::from_slice(&g, [1, h], dev).unwrap();
    let d = xt.softmax().unwrap().softmax_backward(&gt).unwrap();
    assert_close(&host(&d), &fd(&loss), 1e-5, 1e-6);
    let d = xt.log_softmax().unwrap().log_softmax_backward(&gt).unwrap();
    assert_close(&host(&d), &fd(&lsm), 1e-5, 1e-6);
}

fn causal_softmax_masks_future_and_backward_matches_fd(dev: Device) {
    let (bh, t) = (2, 5);
    let scale = 0.7f32;
    let x = rand_vec(63, bh * t * t);
    let g = rand_vec(64, bh * t * t);
    let xt = Tensor::from_slice(&x, [bh, t, t], dev).unwrap();
    let y = xt.causal_softmax(scale).unwrap();
    let yh = host(&y);
    // reference: row (b, q) is softmax(scale·x[b,q,0..=q]) then zeros
    let reference = |x: &[f64]| -> Vec<f64> {
        let mut out = vec![0.0; bh * t * t];
        for r in 0..bh * t {
            let q = r % t;
            let row64: Vec<f64> = x[r * t..r * t + q + 1]
                .iter()
                .map(|&v| v * scale as f64)
                .collect();
            let m = row64.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let s: f64 = row64.iter().map(|v| (v - m).exp()).sum();
            for j in 0..=q {
                out[r * t + j] = (row64[j] - m).exp() / s;
            }
        }
        out
    };
    let x64 = to64(&x);
    assert_close(&yh, &reference(&x64), 1e-6, 1e-9);
    let gt = Tensor::from_slice(&g, [bh, t, t], dev).unwrap();
    let d = host(&y.causal_softmax_backward(&gt, scale).unwrap());
    let loss = |x: &[f64]| -> f64 {
        reference(x)
            .iter()
            .zip(&g)
            .map(|(a, &b)| a * b as f64)
            .sum()
    };
    let want: Vec<f64> = (0..x.len())
        .map(|i| {
            let eps = 1e-5;
            let mut p = x64.clone();
            p[i] += eps;
            let mut m = x64.clone();
            m[i] -= eps;
            (loss(&p) - loss(&m)) / (2.0 * eps)
        })
        .collect();
    assert_close(&d, &want, 1e-5, 1e-6);
}

fn reductions_match_loops(dev: Device) {
    let (n, h) = (37, 300);
    let x = rand_vec(65, n * h);
    let t = Tensor::from_slice(&x, [n, h], dev).unwrap();
    let total: f64 = x.iter().map(|&v| v as f64).sum();
    assert_close(
        &[t.sum_all().unwrap().to_scalar_f32().unwrap()],
        &[total],
        1e-6,
        1e-6,
    );
    assert_close(
        &[t.mean_all().unwrap().to_scalar_f32().unwrap()],
        &[total / (n * h) as f64],
        1e-6,
        1e-9,
    );
    let ss: f64 = x.iter().map(|&v| (v as f64).powi(2)).sum();
    assert_close(
        &[t.sum_squares().unwrap().to_scalar_f32().unwrap()],
        &[ss],
        1e-6,
        0.0,
    );
    assert_close(
        &[t.norm().unwrap().to_scalar_f32().unwrap()],
        &[ss.sqrt()],
        1e-6,
        0.0,
    );
    let rows: Vec<f64> = x
        .chunks(h)
        .map(|r| r.iter().map(|&v| v as f64).sum())
        .collect();
    assert_close(&host(&t.sum_last_dim().unwrap()), &rows, 1e-6, 1e-6);
    let maxes: Vec<f64> = x
        .chunks(h)
        .map(|r| r.iter().fold(f64::MIN, |m, &v| m.max(v as f64)))
        .collect();
    assert_close(&host(&t.max_last_dim().unwrap()), &maxes, 0.0, 0.0);
    let lse: Vec<f64> = x
        .chunks(h)
        .map(|r| r.iter().map(|&v| (v as f64).exp()).sum::<f64>().ln())
        .collect();
    assert_close(&host(&t.logsumexp_last_dim().unwrap()), &lse, 1e-6, 1e-7);
    let cols: Vec<f64> = (0..h)
        .map(|j| (0..n).map(|i| x[i * h + j] as f64).sum())
        .collect();
    let big = Tensor::from_slice(&x, [n, h], dev).unwrap();
    assert_close(&host(&big.sum_rows().unwrap()), &cols, 1e-6, 1e-6);
}

fn reductions_same_bits_for_1_and_3_threads(dev: Device) {
    let t = rand_on(dev, 66, &[1000, 77]);
    let run = || {
        (
            t.sum_all().unwrap().to_scalar_f32().unwrap(),
            host(&t.sum_rows().unwrap()),
            host(&t.softmax().unwrap()),
        )
    };
    let a = in_pool(1, run);
    let b = in_pool(3, run);
    assert_eq!(a.0.to_bits(), b.0.to_bits());
    assert!(same_bits(&a.1, &b.1) && same_bits(&a.2, &b.2));
}

fn topk_sorted_descending_with_lower_index_first_on_ties(dev: Device) {
    // row 0: ties 0.5 at 1 and 3 → 1 before 3; row 1: -0.0 and +0.0 tie → lower index;
    // row 2: NaN ranks first.
    let x = vec![
        0.1,
        0.5,
        0.2,
        0.5, //
        -0.0,
        0.0,
        -1.0,
        -2.0, //
        1.0,
        f32::NAN,
        3.0,
        2.0,
    ];
    let t = Tensor::from_slice(&x, [3, 4], dev).unwrap();
    let (v, i) = t.topk(3).unwrap();
    assert_eq!(i.to_host_i32().unwrap(), vec![1, 3, 2, 0, 1, 2, 1, 2, 3]);
    let v = host(&v);
    assert_eq!(&v[..3], &[0.5, 0.5, 0.2]);
    assert!(v[6].is_nan());
    assert_eq!(&v[7..], &[3.0, 2.0]);
    assert!(matches!(
        t.topk(5),
        Err(Error::InvalidArgument { op: "topk", .. })
    ));
}

fn topk_matches_full_sort_on_random_rows(dev: Device) {
    let (n, e, k) = (50, 64, 6);
    // Quantise to create many ties.
    let x: Vec<f32> = rand_vec(67, n * e)
        .iter()
        .map(|v| (v * 8.0).round())
        .collect();
    let t = Tensor::from_slice(&x, [n, e], dev).unwrap();
    let (v, i) = t.topk(k).unwrap();
    let (v, i) = (host(&v), i.to_host_i32().unwrap());
    for r in 0..n {
        let mut order: Vec<usize> = (0..e).collect();
        // stable sort by descending value keeps lower index first among equals
        order.sort_by(|&a, &b| x[r * e + b].partial_cmp(&x[r * e + a]).unwrap());
        for j in 0..k {
            assert_eq!(i[r * k + j] as usize, order[j], "row {r} slot {j}");
            assert_eq!(v[r * k + j], x[r * e + order[j]]);
        }
    }
}

backend_tests!(
    softmax_and_log_softmax_match_reference,
    softmax_backward_matches_finite_differences,
    causal_softmax_masks_future_and_backward_matches_fd,
    reductions_match_loops,
    reductions_same_bits_for_1_and_3_threads,
    topk_sorted_descending_with_lower_index_first_on_ties,
    topk_matches_full_sort_on_random_rows,
);
