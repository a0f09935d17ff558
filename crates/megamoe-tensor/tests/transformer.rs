//! RMSNorm, RoPE and cross-entropy against f64 references and finite differences.
//!
//! FD: central differences of an f64 reference loss `L = Σ g ⊙ f(x)` with h = 1e-5
//! (truncation ~1e-10, rounding ~1e-11) compared with the crate's f32 gradients at
//! rtol 1e-4 / atol 1e-5: the f32 gradients carry ~1e-6 relative rounding from their
//! inputs, and sums over H ≤ 16 terms add at most a few ulps each.

#![allow(clippy::unwrap_used)] // tests may unwrap (COMMON.md)

mod common;
use common::*;
use megamoe_tensor::{Device, Error, Tensor, IGNORE_INDEX};

fn fd(x: &[f64], f: &dyn Fn(&[f64]) -> f64) -> Vec<f64> {
    let h = 1e-5;
    (0..x.len())
        .map(|i| {
            let mut p = x.to_vec();
            p[i] += h;
            let mut m = x.to_vec();
            m[i] -= h;
            (f(&p) - f(&m)) / (2.0 * h)
        })
        .collect()
}

fn rms_ref(x: &[f64], w: &[f64], h: usize, eps: f64) -> Vec<f64> {
    x.chunks(h)
        .flat_map(|r| {
            let rstd = 1.0 / (r.iter().map(|v| v * v).sum::<f64>() / h as f64 + eps).sqrt();
            r.iter()
                .zip(w)
                .map(move |(v, g)| v * rstd * g)
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn rms_norm_forward_and_split_backward_match_reference_and_fd() {
    let (n, h, eps) = (4, 16, 1e-5f32);
    let x = rand_vec(80, n * h);
    let w: Vec<f32> = rand_vec(81, h).iter().map(|v| 1.0 + 0.5 * v).collect();
    let g = rand_vec(82, n * h);
    let xt = Tensor::from_slice(&x, [n, h], Device::Cpu).unwrap();
    let wt = Tensor::from_slice(&w, [h], Device::Cpu).unwrap();
    let gt = Tensor::from_slice(&g, [n, h], Device::Cpu).unwrap();
    let (y, rstd) = xt.rms_norm(&wt, eps).unwrap();
    let (x64, w64) = (to64(&x), to64(&w));
    assert_close(&host(&y), &rms_ref(&x64, &w64, h, eps as f64), 1e-6, 1e-7);
    assert_eq!(rstd.dims(), &[n]);
    let loss_x = |xx: &[f64]| -> f64 {
        rms_ref(xx, &w64, h, eps as f64)
            .iter()
            .zip(&g)
            .map(|(a, &b)| a * b as f64)
            .sum()
    };
    let loss_w = |ww: &[f64]| -> f64 {
        rms_ref(&x64, ww, h, eps as f64)
            .iter()
            .zip(&g)
            .map(|(a, &b)| a * b as f64)
            .sum()
    };
    let dx = gt.rms_norm_backward_input(&xt, &wt, &rstd).unwrap();
    assert_close(&host(&dx), &fd(&x64, &loss_x), 1e-4, 1e-5);
    let dw = gt.rms_norm_backward_weight(&xt, &rstd).unwrap();
    assert_close(&host(&dw), &fd(&w64, &loss_w), 1e-4, 1e-5);
    assert!(matches!(
        xt.rms_norm(&gt, eps),
        Err(Error::ShapeMismatch { .. })
    ));
}

/// Reference RoPE written as complex multiplication: (x_i + i·x_{i+D/2}) · e^{i·t·θ^(−2i/D)}.
fn rope_ref(x: &[f64], b: usize, t: usize, nh: usize, d: usize, theta: f64) -> Vec<f64> {
    let mut y = x.to_vec();
    for bi in 0..b {
        for p in 0..t {
            for hh in 0..nh {
                let base = ((bi * t + p) * nh + hh) * d;
                for i in 0..d / 2 {
                    let ang = p as f64 * theta.powf(-((2 * i) as f64) / d as f64);
                    let (re, im) = (x[base + i], x[base + i + d / 2]);
                    y[base + i] = re * ang.cos() - im * ang.sin();
                    y[base + i + d / 2] = re * ang.sin() + im * ang.cos();
                }
            }
        }
    }
    y
}

#[test]
fn rope_matches_complex_rotation_and_backward_matches_fd() {
    let (b, t, nh, d, theta) = (2, 5, 3, 8, 10000.0f32);
    let x = rand_vec(83, b * t * nh * d);
    let g = rand_vec(84, x.len());
    let xt = Tensor::from_slice(&x, [b, t, nh, d], Device::Cpu).unwrap();
    let x64 = to64(&x);
    assert_close(
        &host(&xt.rope(theta).unwrap()),
        &rope_ref(&x64, b, t, nh, d, theta as f64),
        1e-5,
        1e-6,
    );
    let gt = Tensor::from_slice(&g, [b, t, nh, d], Device::Cpu).unwrap();
    let loss = |xx: &[f64]| -> f64 {
        rope_ref(xx, b, t, nh, d, theta as f64)
            .iter()
            .zip(&g)
            .map(|(a, &c)| a * c as f64)
            .sum()
    };
    assert_close(
        &host(&gt.rope_backward(theta).unwrap()),
        &fd(&x64, &loss),
        1e-4,
        1e-5,
    );
    // position 0 is the identity
    assert_eq!(host(&xt.rope(theta).unwrap())[..nh * d], x[..nh * d]);
    assert!(
        Tensor::from_slice(&x[..b * t * nh * 6], [b, t, nh, 6], Device::Cpu)
            .unwrap()
            .rope(theta)
            .is_ok()
    );
    assert!(
        Tensor::from_slice(&x[..b * t * nh * 5], [b, t, nh, 5], Device::Cpu)
            .unwrap()
            .rope(theta)
            .is_err()
    );
}

#[test]
fn cross_entropy_ignores_rows_and_gradient_matches_fd() {
    let (n, v) = (5, 7);
    let x: Vec<f32> = rand_vec(85, n * v).iter().map(|a| 3.0 * a).collect();
    let targets = [3, IGNORE_INDEX, 0, 6, IGNORE_INDEX];
    let xt = Tensor::from_slice(&x, [n, v], Device::Cpu).unwrap();
    let tt = Tensor::from_vec_i32(targets.to_vec(), [n], Device::Cpu).unwrap();
    let (loss, d) = xt.cross_entropy(&tt, IGNORE_INDEX).unwrap();
    let loss_ref = |xx: &[f64]| -> f64 {
        let mut s = 0.0;
        let mut cnt = 0.0;
        for (r, &t) in targets.iter().enumerate() {
            if t == IGNORE_INDEX {
                continue;
            }
            let row = &xx[r * v..(r + 1) * v];
            let lse = row.iter().map(|a| a.exp()).sum::<f64>().ln();
            s += lse - row[t as usize];
            cnt += 1.0;
        }
        s / cnt
    };
    let x64 = to64(&x);
    assert_close(
        &[loss.to_scalar_f32().unwrap()],
        &[loss_ref(&x64)],
        1e-6,
        0.0,
    );
    let dh = host(&d);
    assert_close(&dh, &fd(&x64, &loss_ref), 1e-4, 1e-6);
    assert!(
        dh[v..2 * v].iter().all(|&a| a == 0.0),
        "ignored row has zero gradient"
    );
    // all ignored: zero loss and gradient
    let none = Tensor::from_vec_i32(vec![IGNORE_INDEX; n], [n], Device::Cpu).unwrap();
    let (l0, d0) = xt.cross_entropy(&none, IGNORE_INDEX).unwrap();
    assert_eq!(l0.to_scalar_f32().unwrap(), 0.0);
    assert!(host(&d0).iter().all(|&a| a == 0.0));
    let bad = Tensor::from_vec_i32(vec![0, 7, 0, 0, 0], [n], Device::Cpu).unwrap();
    assert!(matches!(
        xt.cross_entropy(&bad, IGNORE_INDEX),
        Err(Error::IndexOutOfRange {
            index: 7,
            position: 1,
            ..
        })
    ));
}
