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

/// `silu(gate) · up`: one pass, in fixed `ELEMS_PER_TASK` pieces (bits independent of the
/// thread count), with the vectorisable sigmoid of [`sigmoid_vec`].
pub(crate) fn swiglu(gate: &[f32], up: &[f32]) -> Vec<f32> {
    let mut out = vec![0.0f32; gate.len()];
    out.par_chunks_mut(ELEMS_PER_TASK)
        .zip(gate.par_chunks(ELEMS_PER_TASK))
        .zip(up.par_chunks(ELEMS_PER_TASK))
        .for_each(|((o, g), u)| simd::swiglu(o, g, u));
    out
}

/// `(d_gate, d_up) = (dy · up · silu'(gate), dy · silu(gate))`: one pass over the three
/// inputs writing both outputs, σ(gate) evaluated once per element.
pub(crate) fn swiglu_backward(gate: &[f32], up: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let mut d_gate = vec![0.0f32; gate.len()];
    let mut d_up = vec![0.0f32; gate.len()];
    d_gate
        .par_chunks_mut(ELEMS_PER_TASK)
        .zip(d_up.par_chunks_mut(ELEMS_PER_TASK))
        .zip(gate.par_chunks(ELEMS_PER_TASK))
        .zip(
            up.par_chunks(ELEMS_PER_TASK)
                .zip(dy.par_chunks(ELEMS_PER_TASK)),
        )
        .for_each(|(((dg, du), g), (u, d))| simd::swiglu_backward(dg, du, g, u, d));
    (d_gate, d_up)
}

/// SwiGLU of gate‖up rows: `gate_up [rows, 2f]` → `[rows, f]`, row `r` being
/// `silu(gate_up[r, ..f]) · gate_up[r, f..]` (per element the bits of [`swiglu`]); whole rows
/// per task, `rows_per_task(2f)` of them (bits independent of the thread count).
pub(crate) fn swiglu_gate_up(gate_up: &[f32], f: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; gate_up.len() / 2];
    if f == 0 {
        return out;
    }
    let rows = super::rows_per_task(2 * f);
    out.par_chunks_mut(rows * f)
        .zip(gate_up.par_chunks(rows * 2 * f))
        .for_each(|(o, gu)| simd::swiglu_gate_up(o, gu, f));
    out
}

/// Backward of [`swiglu_gate_up`]: `d_gate_up [rows, 2f]` (the `(d_gate, d_up)` of
/// [`swiglu_backward`] side by side in each row) from `gate_up [rows, 2f]`, `dy [rows, f]`.
pub(crate) fn swiglu_gate_up_backward(gate_up: &[f32], dy: &[f32], f: usize) -> Vec<f32> {
    let mut d_gate_up = vec![0.0f32; gate_up.len()];
    if f == 0 {
        return d_gate_up;
    }
    let rows = super::rows_per_task(2 * f);
    d_gate_up
        .par_chunks_mut(rows * 2 * f)
        .zip(gate_up.par_chunks(rows * 2 * f))
        .zip(dy.par_chunks(rows * f))
        .for_each(|((dgu, gu), d)| simd::swiglu_gate_up_backward(dgu, gu, d, f));
    d_gate_up
}

/// `e^x` for `x ≤ 0` (the sigmoid's `e^{−|x|}`) without a libm call, so that loops over it
/// vectorise: `e^x = 2ⁿ · e^r` with `n = round(x·log₂e)`, `r = x − n·ln2` (ln 2 in two
/// parts, Cody–Waite), `|r| ≤ ln2/2`, and `e^r` by its degree-7 Taylor polynomial
/// (truncation `|r|⁸/8! < 5e-9`, below f32's 6e-8 ulp). Relative error ≲ 2 ulp. Inputs below
/// −87 are clamped (e^−87 ≈ 1.6e-38, the smallest result kept normal).
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4; // 355/512: exact in f32, n·LN2_HI exact for |n| ≤ 2^14
    const LN2_LO: f32 = -2.121_944_4e-4; // ln 2 − LN2_HI
    const ROUND: f32 = 12_582_912.0; // 1.5·2²³: adding and subtracting it rounds to integer
    let x = x.max(-87.0);
    let t = x * LOG2_E + ROUND;
    // t = 1.5·2²³ + n exactly, so the low mantissa bits of t hold n (two's complement).
    let n = t - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // 2ⁿ for n in [−126, 0]: the biased exponent n + 127 in [1, 127] is the low 9 bits of
    // t's bit pattern plus 127 (the pattern's higher bits shift out). Integer ops only, so
    // the loop stays vectorised (a float→int cast would not).
    let two_n = f32::from_bits(t.to_bits().wrapping_add(127) << 23);
    p * two_n
}

/// Logistic sigmoid without branches or libm calls (vectorisable): with `e = e^{−|x|}`,
/// `σ(x) = 1/(1+e)` for `x ≥ 0` and `e/(1+e)` otherwise — the same overflow-free split as
/// [`sigmoid`], agreeing with it to a few ulp.
#[inline(always)]
fn sigmoid_vec(x: f32) -> f32 {
    let e = exp_nonpositive(-x.abs());
    let num = if x >= 0.0 { 1.0 } else { e };
    num / (1.0 + e)
}

/// Slice kernels of the fused activations, compiled for AVX-512F, AVX2+FMA and the
/// baseline and picked at run time. The code is identical for each target and Rust never
/// contracts `a·b + c` into an FMA, so every target gives the same bits.
mod simd {
    use super::sigmoid_vec;

    /// `o = silu(g) · u`.
    #[inline(always)]
    fn swiglu_body(o: &mut [f32], g: &[f32], u: &[f32]) {
        let n = o.len();
        let (g, u) = (&g[..n], &u[..n]);
        for i in 0..n {
            let s = sigmoid_vec(g[i]);
            o[i] = g[i] * s * u[i];
        }
    }

    /// `dg = d · u · s(1 + g(1 − s))`, `du = d · g · s` with `s = σ(g)`.
    #[inline(always)]
    fn swiglu_backward_body(dg: &mut [f32], du: &mut [f32], g: &[f32], u: &[f32], d: &[f32]) {
        let n = dg.len();
        let (du, g, u, d) = (&mut du[..n], &g[..n], &u[..n], &d[..n]);
        for i in 0..n {
            let s = sigmoid_vec(g[i]);
            dg[i] = d[i] * u[i] * (s * (1.0 + g[i] * (1.0 - s)));
            du[i] = d[i] * (g[i] * s);
        }
    }

    /// Rows of `o [.., f]` from rows of `gu [.., 2f]` (gate half, then up half).
    #[inline(always)]
    fn swiglu_gate_up_body(o: &mut [f32], gu: &[f32], f: usize) {
        for (o, gu) in o.chunks_exact_mut(f).zip(gu.chunks_exact(2 * f)) {
            let (g, u) = gu.split_at(f);
            swiglu_body(o, g, u);
        }
    }

    /// Rows of `dgu [.., 2f]` (d gate half, d up half) from `gu [.., 2f]` and `d [.., f]`.
    #[inline(always)]
    fn swiglu_gate_up_backward_body(dgu: &mut [f32], gu: &[f32], d: &[f32], f: usize) {
        for ((dgu, gu), d) in dgu
            .chunks_exact_mut(2 * f)
            .zip(gu.chunks_exact(2 * f))
            .zip(d.chunks_exact(f))
        {
            let (dg, du) = dgu.split_at_mut(f);
            let (g, u) = gu.split_at(f);
            swiglu_backward_body(dg, du, g, u, d);
        }
    }

    macro_rules! dispatch {
        ($name:ident, $body:ident, ($($arg:ident : $ty:ty),*)) => {
            pub(super) fn $name($($arg: $ty),*) {
                #[cfg(target_arch = "x86_64")]
                {
                    #[target_feature(enable = "avx512f")]
                    fn avx512($($arg: $ty),*) {
                        $body($($arg),*)
                    }
                    #[target_feature(enable = "avx2,fma")]
                    fn avx2($($arg: $ty),*) {
                        $body($($arg),*)
                    }
                    if std::arch::is_x86_feature_detected!("avx512f") {
                        // SAFETY: the CPU supports AVX-512F (checked just above).
                        return unsafe { avx512($($arg),*) };
                    }
                    if std::arch::is_x86_feature_detected!("avx2")
                        && std::arch::is_x86_feature_detected!("fma")
                    {
                        // SAFETY: the CPU supports AVX2 and FMA (checked just above).
                        return unsafe { avx2($($arg),*) };
                    }
                }
                $body($($arg),*)
            }
        };
    }

    dispatch!(swiglu, swiglu_body, (o: &mut [f32], g: &[f32], u: &[f32]));
    dispatch!(
        swiglu_gate_up,
        swiglu_gate_up_body,
        (o: &mut [f32], gu: &[f32], f: usize)
    );
    dispatch!(
        swiglu_gate_up_backward,
        swiglu_gate_up_backward_body,
        (dgu: &mut [f32], gu: &[f32], d: &[f32], f: usize)
    );
    dispatch!(
        swiglu_backward,
        swiglu_backward_body,
        (dg: &mut [f32], du: &mut [f32], g: &[f32], u: &[f32], d: &[f32])
    );
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

/// `x · s + 0` (the bits of `UnaryOp::Affine { mul: s, add: 0 }`).
pub(crate) fn scale(x: &[f32], s: f32) -> Vec<f32> {
    par_map(x, |v| v * s + 0.0)
}

/// In place `x ← x · s + 0`.
pub(crate) fn scale_in_place(x: &mut [f32], s: f32) {
    x.par_iter_mut()
        .with_min_len(ELEMS_PER_TASK)
        .for_each(|v| *v = *v * s + 0.0);
}

/// `out[i] = c[i] != 0 ? a[i] : b[i]`.
pub(crate) fn select(c: &[f32], a: &[f32], b: &[f32]) -> Vec<f32> {
    c.par_iter()
        .zip(a.par_iter().zip(b.par_iter()))
        .with_min_len(ELEMS_PER_TASK)
        .map(|(&c, (&a, &b))| if c != 0.0 { a } else { b })
        .collect()
}
