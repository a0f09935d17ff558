//! CPU comparison-mask kernels: `1.0` where a predicate holds, else `0.0`.

use super::par_map;

/// `out[i] = 1` if `x[i] > thr` else `0` (NaN gives 0).
pub(crate) fn gt_scalar(x: &[f32], thr: f32) -> Vec<f32> {
    par_map(x, |&v| if v > thr { 1.0 } else { 0.0 })
}

/// `out[i] = 1` if `x[i] == v` else `0`.
pub(crate) fn eq_scalar(x: &[f32], v: f32) -> Vec<f32> {
    par_map(x, |&e| if e == v { 1.0 } else { 0.0 })
}
