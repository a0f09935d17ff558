//! CPU elementwise kernels: the per-element formulas of [`UnaryOp`] and [`BinaryOp`] (the
//! spec for every backend) and row/column broadcasts.

use rayon::prelude::*;

use super::{par_map, par_map2, ELEMS_PER_TASK};
use crate::ops::elementwise::{BinaryOp, UnaryOp};

/// sqrt(2/π), for the tanh form of GELU.
const SQRT_2_OVER_PI: f32 = 0.797_884_6;
/// 1/sqrt(2π), the standard normal density at 0.
const INV_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

/// Logistic sigmoid, evaluated without overflow for either sign of `x`.
#[inline]
pub(crate) fn sigmoid(x: f32) -> f32 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// GELU, exact form: `x · Φ(x) = ½ x (1 + erf(x/√2))`, erf evaluated in f64.
#[inline]
fn gelu_erf(x: f32) -> f32 {
    let xd = x as f64;
    (0.5 * xd * (1.0 + libm::erf(xd * std::f64::consts::FRAC_1_SQRT_2))) as f32
}

/// d/dx of exact GELU: `Φ(x) + x φ(x)`.
#[inline]
fn gelu_erf_grad(x: f32) -> f32 {
    let xd = x as f64;
    let cdf = 0.5 * (1.0 + libm::erf(xd * std::f64::consts::FRAC_1_SQRT_2));
    let pdf = INV_SQRT_2PI * (-0.5 * xd * xd).exp();
    (cdf + xd * pdf) as f32
}

/// GELU, tanh form (Hendrycks & Gimpel): `½ x (1 + tanh(√(2/π)(x + 0.044715 x³)))`.
#[inline]
fn gelu_tanh(x: f32) -> f32 {
    let u = SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x);
    0.5 * x * (1.0 + u.tanh())
}

/// d/dx of the tanh-form GELU: `½(1+t) + ½ x (1−t²) √(2/π)(1 + 3·0.044715 x²)`.
#[inline]
fn gelu_tanh_grad(x: f32) -> f32 {
    let u = SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x);
    let t = u.tanh();
    0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044_715 * x * x)
}

/// SiLU `x σ(x)`.
#[inline]
pub(crate) fn silu(x: f32) -> f32 {
    x * sigmoid(x)
}

/// d/dx SiLU = `σ(x)(1 + x(1 − σ(x)))`.
#[inline]
pub(crate) fn silu_grad(x: f32) -> f32 {
    let s = sigmoid(x);
    s * (1.0 + x * (1.0 - s))
}

/// Applies a unary op to every element.
pub(crate) fn unary(op: UnaryOp, x: &[f32]) -> Vec<f32> {
    match op {
        UnaryOp::Neg => par_map(x, |v| -v),
        UnaryOp::Abs => par_map(x, |v| v.abs()),
        UnaryOp::Exp => par_map(x, |v| v.exp()),
        UnaryOp::Log => par_map(x, |v| v.ln()),
        UnaryOp::Sqrt => par_map(x, |v| v.sqrt()),
        UnaryOp::Recip => par_map(x, |v| 1.0 / v),
        UnaryOp::Square => par_map(x, |v| v * v),
        UnaryOp::Sigmoid => par_map(x, |v| sigmoid(*v)),
        UnaryOp::Tanh => par_map(x, |v| v.tanh()),
        UnaryOp::Silu => par_map(x, |v| silu(*v)),
        UnaryOp::GeluErf => par_map(x, |v| gelu_erf(*v)),
        UnaryOp::GeluTanh => par_map(x, |v| gelu_tanh(*v)),
        UnaryOp::Relu => par_map(x, |v| v.max(0.0)),
        UnaryOp::Relu2 => par_map(x, |v| {
            let r = v.max(0.0);
            r * r
        }),
        UnaryOp::Affine { mul, add } => par_map(x, |v| v * mul + add),
    }
}

/// Applies a binary op elementwise to equal-length slices.
pub(crate) fn binary(op: BinaryOp, a: &[f32], b: &[f32]) -> Vec<f32> {
    match op {
        BinaryOp::Add => par_map2(a, b, |x, y| x + y),
        BinaryOp::Sub => par_map2(a, b, |x, y| x - y),
        BinaryOp::Mul => par_map2(a, b, |x, y| x * y),
        BinaryOp::Div => par_map2(a, b, |x, y| x / y),
        BinaryOp::Maximum => par_map2(a, b, |x, y| x.max(y)),
        BinaryOp::Minimum => par_map2(a, b, |x, y| x.min(y)),
        BinaryOp::SiluBackward => par_map2(a, b, |x, dy| dy * silu_grad(x)),
        BinaryOp::GeluErfBackward => par_map2(a, b, |x, dy| dy * gelu_erf_grad(x)),
        BinaryOp::GeluTanhBackward => par_map2(a, b, |x, dy| dy * gelu_tanh_grad(x)),
        BinaryOp::SigmoidBackward => par_map2(a, b, |y, dy| dy * y * (1.0 - y)),
        BinaryOp::TanhBackward => par_map2(a, b, |y, dy| dy * (1.0 - y * y)),
        BinaryOp::ReluBackward => par_map2(a, b, |x, dy| if x > 0.0 { dy } else { 0.0 }),
        BinaryOp::Relu2Backward => par_map2(a, b, |x, dy| 2.0 * x.max(0.0) * dy),
    }
}

/// `silu(gate) · up`.
pub(crate) fn swiglu(gate: &[f32], up: &[f32]) -> Vec<f32> {
    par_map2(gate, up, |g, u| silu(g) * u)
}

/// `(d_gate, d_up) = (dy · up · silu'(gate), dy · silu(gate))`.
pub(crate) fn swiglu_backward(gate: &[f32], up: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let d_gate = super::par_map3(gate, up, dy, |g, u, d| d * u * silu_grad(g));
    let d_up = par_map2(gate, dy, |g, d| d * silu(g));
    (d_gate, d_up)
}

/// `out[r, j] = f(x[r, j], v[j])` for `x [rows, len]`, `v [len]` (row broadcast).
pub(crate) fn broadcast_row(
    x: &[f32],
    v: &[f32],
    f: impl Fn(f32, f32) -> f32 + Sync + Send,
) -> Vec<f32> {
    let len = v.len();
    if len == 0 {
        return Vec::new();
    }
    super::par_rows(x, len, len, x.len() / len, |_, xr, o| {
        for ((o, &a), &b) in o.iter_mut().zip(xr).zip(v) {
            *o = f(a, b);
        }
    })
}

/// `out[r, j] = x[r, j] · s[r]` for `x [rows, len]`, `s [rows]` (column broadcast).
pub(crate) fn scale_rows(x: &[f32], s: &[f32]) -> Vec<f32> {
    let rows = s.len();
    let len = x.len().checked_div(rows).unwrap_or(0);
    super::par_rows(x, len, len, rows, |r, xr, o| {
        let sr = s[r];
        for (o, &a) in o.iter_mut().zip(xr) {
            *o = a * sr;
        }
    })
}

/// In place `dst[i] += alpha · src[i]`.
pub(crate) fn axpy(dst: &mut [f32], alpha: f32, src: &[f32]) {
    dst.par_iter_mut()
        .zip(src.par_iter())
        .with_min_len(ELEMS_PER_TASK)
        .for_each(|(d, &s)| {
            *d += alpha * s;
        });
}
