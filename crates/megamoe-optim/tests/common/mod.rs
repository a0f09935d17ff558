//! Shared test helpers.
#![allow(dead_code)]

use megamoe_plan::{LrSchedule, MomentDtype, MuonPlan, MuonScale, OptimPlan, OptimizerKind};
use megamoe_tensor::{Device, Tensor};

/// An f32 CPU tensor.
pub fn t(data: &[f32], dims: &[usize]) -> Tensor {
    Tensor::from_vec_f32(data.to_vec(), dims.to_vec(), Device::Cpu).unwrap()
}

/// Host values.
pub fn host(x: &Tensor) -> Vec<f32> {
    x.to_host_f32().unwrap()
}

/// Deterministic pseudo-random values in [-1, 1) (splitmix64), independent of the crate.
pub fn rand_vec(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
    (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            ((z >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32
        })
        .collect()
}

/// A random tensor.
pub fn rand_t(seed: u64, dims: &[usize]) -> Tensor {
    let n = dims.iter().product();
    t(&rand_vec(seed, n), dims)
}

/// max |a−b| / max(max |b|, tiny).
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b
        .iter()
        .fold(0.0f64, |m, &v| m.max(v.abs() as f64))
        .max(1e-30);
    let diff = a
        .iter()
        .zip(b)
        .fold(0.0f64, |m, (&x, &y)| m.max((x as f64 - y as f64).abs()));
    diff / scale
}

/// An AdamW plan.
pub fn adamw_plan(lr: f64, wd: f64) -> OptimPlan {
    OptimPlan {
        kind: OptimizerKind::AdamW,
        lr,
        min_lr: 0.0,
        warmup_steps: 0,
        lr_schedule: LrSchedule::Constant,
        weight_decay: wd,
        beta1: 0.9,
        beta2: 0.99,
        eps: 1e-8,
        moment_dtype: MomentDtype::F32,
        grad_clip: None,
        muon: None,
    }
}

/// A Muon plan (AdamW lr `lr`, Muon lr `muon_lr`).
pub fn muon_plan(lr: f64, muon_lr: f64, wd: f64, scale: MuonScale, nesterov: bool) -> OptimPlan {
    OptimPlan {
        kind: OptimizerKind::Muon,
        muon: Some(MuonPlan {
            momentum: 0.95,
            nesterov,
            scale,
            lr: muon_lr,
        }),
        ..adamw_plan(lr, wd)
    }
}

// ------------------------------------------------------------------ f64 reference Muon

/// `a [m, k] · b [k, n]` in f64.
pub fn mm(a: &[f64], b: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut c = vec![0.0; m * n];
    for i in 0..m {
        for p in 0..k {
            let av = a[i * k + p];
            for j in 0..n {
                c[i * n + j] += av * b[p * n + j];
            }
        }
    }
    c
}

/// Transpose of `a [m, n]`.
pub fn tr(a: &[f64], m: usize, n: usize) -> Vec<f64> {
    let mut t = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            t[j * m + i] = a[i * n + j];
        }
    }
    t
}

/// The spec's NS5, written out plainly in f64.
pub fn ns5_ref(g: &[f64], m: usize, n: usize) -> Vec<f64> {
    let (a, b, c) = (3.4445, -4.7750, 2.0315);
    let (mut x, r, cols) = if m > n {
        (tr(g, m, n), n, m)
    } else {
        (g.to_vec(), m, n)
    };
    let norm = x.iter().map(|v| v * v).sum::<f64>().sqrt();
    for v in &mut x {
        *v /= norm + 1e-7;
    }
    for _ in 0..5 {
        let xt = tr(&x, r, cols);
        let am = mm(&x, &xt, r, cols, r);
        let a2 = mm(&am, &am, r, r, r);
        let bm: Vec<f64> = am.iter().zip(&a2).map(|(p, q)| b * p + c * q).collect();
        let bx = mm(&bm, &x, r, r, cols);
        x = x.iter().zip(&bx).map(|(p, q)| a * p + q).collect();
    }
    if m > n {
        tr(&x, r, cols)
    } else {
        x
    }
}

/// One Muon step on `w [m, n]` by the spec formula (f64): returns the new `w`, updates `mom`.
/// `blocks` are row blocks (empty = whole matrix); `moonlight` picks the scale rule.
#[allow(clippy::too_many_arguments)]
pub fn muon_ref_step(
    w: &mut [f64],
    g: &[f64],
    mom: &mut [f64],
    m: usize,
    n: usize,
    beta: f64,
    nesterov: bool,
    lr: f64,
    wd: f64,
    moonlight: bool,
    blocks: &[usize],
) {
    for (mv, gv) in mom.iter_mut().zip(g) {
        *mv = beta * *mv + (1.0 - beta) * gv;
    }
    let u: Vec<f64> = if nesterov {
        g.iter()
            .zip(mom.iter())
            .map(|(gv, mv)| (1.0 - beta) * gv + beta * mv)
            .collect()
    } else {
        mom.to_vec()
    };
    let whole = [m];
    let blocks = if blocks.is_empty() {
        &whole[..]
    } else {
        blocks
    };
    let mut row = 0;
    for &rows in blocks {
        let ub = &u[row * n..(row + rows) * n];
        let o = ns5_ref(ub, rows, n);
        let scale = if moonlight {
            0.2 * (rows.max(n) as f64).sqrt()
        } else {
            (rows as f64 / n as f64).max(1.0).sqrt()
        };
        for (i, ov) in o.iter().enumerate() {
            let wv = &mut w[row * n + i];
            *wv = *wv * (1.0 - lr * wd) - lr * scale * ov;
        }
        row += rows;
    }
}

/// f32 → f64.
pub fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// Eigenvalues of a symmetric `n×n` matrix by cyclic Jacobi rotations.
pub fn sym_eigenvalues(mut a: Vec<f64>, n: usize) -> Vec<f64> {
    for _sweep in 0..100 {
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i * n + j] * a[i * n + j])
            .sum();
        if off < 1e-22 {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = a[p * n + q];
                if apq.abs() < 1e-300 {
                    continue;
                }
                let theta = (a[q * n + q] - a[p * n + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..n {
                    let akp = a[k * n + p];
                    let akq = a[k * n + q];
                    a[k * n + p] = c * akp - s * akq;
                    a[k * n + q] = s * akp + c * akq;
                }
                for k in 0..n {
                    let apk = a[p * n + k];
                    let aqk = a[q * n + k];
                    a[p * n + k] = c * apk - s * aqk;
                    a[q * n + k] = s * apk + c * aqk;
                }
            }
        }
    }
    (0..n).map(|i| a[i * n + i]).collect()
}

/// Singular values of `x [m, n]` (via eigenvalues of the smaller Gram matrix).
pub fn singular_values(x: &[f64], m: usize, n: usize) -> Vec<f64> {
    let (gram, k) = if m <= n {
        (mm(x, &tr(x, m, n), m, n, m), m)
    } else {
        (mm(&tr(x, m, n), x, n, m, n), n)
    };
    sym_eigenvalues(gram, k)
        .into_iter()
        .map(|e| e.max(0.0).sqrt())
        .collect()
}
