//! Test-only helpers: deterministic random tensors and central finite differences.
//!
//! FD runs in f32 (the only float dtype with full math): with step `EPS = 1e-2` the
//! truncation error is O(EPS²) ≈ 1e-4 relative and the rounding error about
//! 1e-7·|L|/EPS; the tolerance `REL_TOL = 2e-2` (relative to the largest |grad|, plus
//! `ABS_TOL`) leaves room for both on the tiny shapes the tests use.

use megamoe_tensor::{Device, Tensor};

/// FD step.
pub const EPS: f32 = 1e-2;
/// Relative tolerance against max |analytic grad|.
pub const REL_TOL: f64 = 2e-2;
/// Absolute floor.
pub const ABS_TOL: f64 = 2e-3;

/// splitmix64 step.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Standard-normal-ish values (sum of uniforms; exact distribution is irrelevant here).
pub fn randn(seed: u64, dims: &[usize], std: f32) -> Tensor {
    let n: usize = dims.iter().product();
    let v = (0..n)
        .map(|i| {
            let mut s = 0.0f32;
            for j in 0..4u64 {
                let u = mix(seed.wrapping_mul(1_000_003) ^ ((i as u64) << 3 | j)) >> 40;
                s += u as f32 / (1u64 << 24) as f32;
            }
            (s - 2.0) * 1.732 * std
        })
        .collect();
    Tensor::from_vec_f32(v, dims.to_vec(), Device::Cpu).unwrap()
}

/// A random projection `L = Σ r ⊙ y` used to turn a tensor output into a scalar loss.
pub struct Probe {
    /// The upstream gradient `dL/dy = r`.
    pub r: Tensor,
}

impl Probe {
    /// A probe for outputs of shape `dims`.
    pub fn new(seed: u64, dims: &[usize]) -> Probe {
        Probe {
            r: randn(seed, dims, 1.0),
        }
    }
    /// `Σ r ⊙ y` in f64.
    pub fn loss(&self, y: &Tensor) -> f64 {
        let r = self.r.to_host_f32().unwrap();
        let y = y.to_host_f32().unwrap();
        assert_eq!(r.len(), y.len());
        r.iter().zip(&y).map(|(a, b)| *a as f64 * *b as f64).sum()
    }
}

/// Central-difference check of `analytic = d f / d x` at `x`, on up to 48 elements.
pub fn check(name: &str, x: &Tensor, analytic: &Tensor, f: impl Fn(&Tensor) -> f64) {
    check_with(name, x, analytic, f, EPS, REL_TOL)
}

/// [`check`] with an explicit step and relative tolerance.
pub fn check_with(
    name: &str,
    x: &Tensor,
    analytic: &Tensor,
    f: impl Fn(&Tensor) -> f64,
    eps: f32,
    rel_tol: f64,
) {
    check_abs(name, x, analytic, eps, rel_tol, ABS_TOL, f)
}

/// [`check`] with explicit step, relative and absolute tolerances.
pub fn check_abs(
    name: &str,
    x: &Tensor,
    analytic: &Tensor,
    eps: f32,
    rel_tol: f64,
    abs_tol: f64,
    f: impl Fn(&Tensor) -> f64,
) {
    let kinks = check_piecewise(name, x, analytic, eps, rel_tol, abs_tol, false, f);
    assert_eq!(kinks, 0, "{name}: unexpected kinks");
}

/// Like [`check_abs`] for a piecewise-smooth `f` (skip masks, thresholds): an element whose
/// forward and backward one-sided differences disagree by more than the tolerance sits on a
/// mask boundary and is skipped (FD is meaningless there); returns how many were skipped.
/// A wrong analytic gradient cannot hide this way: on a smooth piece both one-sided
/// differences agree with each other whatever the analytic value is.
#[allow(clippy::too_many_arguments)]
pub fn check_piecewise(
    name: &str,
    x: &Tensor,
    analytic: &Tensor,
    eps: f32,
    rel_tol: f64,
    abs_tol: f64,
    allow_kinks: bool,
    f: impl Fn(&Tensor) -> f64,
) -> usize {
    assert_eq!(x.dims(), analytic.dims(), "{name}: grad shape");
    let base = x.to_host_f32().unwrap();
    let a = analytic.to_host_f32().unwrap();
    let scale = a.iter().fold(0.0f64, |m, v| m.max(v.abs() as f64));
    let n = base.len();
    let stride = n.div_ceil(48).max(1);
    let mut worst = 0.0f64;
    let mut kinks = 0;
    for i in (0..n).step_by(stride) {
        let mut p = base.clone();
        p[i] = base[i] + eps;
        let up = f(&Tensor::from_vec_f32(p.clone(), x.dims().to_vec(), Device::Cpu).unwrap());
        p[i] = base[i] - eps;
        let dn = f(&Tensor::from_vec_f32(p, x.dims().to_vec(), Device::Cpu).unwrap());
        let fd = (up - dn) / (2.0 * eps as f64);
        if allow_kinks {
            let mid = f(x);
            let (fwd, bwd) = ((up - mid) / eps as f64, (mid - dn) / eps as f64);
            // A mask flip is a jump J in f: |fwd − bwd| ≈ J/eps, far above the smooth
            // curvature term eps·f''.
            if (fwd - bwd).abs() > 0.25 * scale + abs_tol {
                kinks += 1;
                continue;
            }
        }
        let err = (fd - a[i] as f64).abs();
        worst = worst.max(err);
        assert!(
            err <= rel_tol * scale + abs_tol,
            "{name}[{i}]: analytic {} vs finite difference {fd} (scale {scale})",
            a[i]
        );
    }
    assert!(scale > 0.0, "{name}: analytic gradient is all zero");
    let _ = worst;
    kinks
}

/// One tensor's result of [`fd_tensor`].
#[derive(Debug, Clone, Copy)]
pub struct FdResult {
    /// Elements skipped on a mask boundary.
    pub kinks: usize,
    /// Elements compared.
    pub checked: usize,
    /// `‖fd − analytic‖₂` over the compared elements (f64).
    pub err: f64,
    /// `‖analytic‖₂` over the compared elements (f64).
    pub norm: f64,
}

impl FdResult {
    /// Relative error `‖fd − analytic‖₂ / ‖analytic‖₂`.
    pub fn rel(&self) -> f64 {
        self.err / self.norm
    }
}

/// Per-tensor finite differences for the whole-model tests: central differences on up to
/// 48 elements (elements on a mask boundary skipped as in [`check_piecewise`]), summarised
/// as ONE error norm for the tensor, accumulated in f64. Unlike a per-element bound against
/// the tensor's largest gradient, a bias in one loss term's share of the gradient (a weight
/// applied twice, a missing scale) moves this norm by that share.
pub fn fd_tensor(
    name: &str,
    x: &Tensor,
    analytic: &Tensor,
    eps: f32,
    f: impl Fn(&Tensor) -> f64,
) -> FdResult {
    assert_eq!(x.dims(), analytic.dims(), "{name}: grad shape");
    let base = x.to_host_f32().unwrap();
    let a = analytic.to_host_f32().unwrap();
    let scale = a.iter().fold(0.0f64, |m, v| m.max(v.abs() as f64));
    assert!(scale > 0.0, "{name}: analytic gradient is all zero");
    let n = base.len();
    let stride = n.div_ceil(48).max(1);
    let mid = f(x);
    let (mut err2, mut ref2, mut kinks, mut checked) = (0.0f64, 0.0f64, 0, 0);
    for i in (0..n).step_by(stride) {
        let mut p = base.clone();
        p[i] = base[i] + eps;
        let up = f(&Tensor::from_vec_f32(p.clone(), x.dims().to_vec(), Device::Cpu).unwrap());
        p[i] = base[i] - eps;
        let dn = f(&Tensor::from_vec_f32(p, x.dims().to_vec(), Device::Cpu).unwrap());
        let (fwd, bwd) = ((up - mid) / eps as f64, (mid - dn) / eps as f64);
        // A mask flip is a jump J in f: |fwd − bwd| ≈ J/eps, far above eps·f''.
        if (fwd - bwd).abs() > 0.25 * scale + 1e-3 {
            kinks += 1;
            continue;
        }
        let fd = (up - dn) / (2.0 * eps as f64);
        err2 += (fd - a[i] as f64).powi(2);
        ref2 += (a[i] as f64).powi(2);
        checked += 1;
    }
    assert!(checked > 0 && ref2 > 0.0, "{name}: nothing checked");
    FdResult {
        kinks,
        checked,
        err: err2.sqrt(),
        norm: ref2.sqrt(),
    }
}
