//! [`RngKernels`] on the CPU.

use std::ops::Range;

use crate::backend::CpuBackend;
use crate::cpu::rng as kernel;
use crate::ops::rng::{InitDist, RngKernels};
use crate::{Result, Shape, Tensor};

impl RngKernels for CpuBackend {
    fn rand_named_slice(
        &self,
        seed: u64,
        name: &str,
        global_shape: &Shape,
        dim: usize,
        range: Range<usize>,
        dist: InitDist,
    ) -> Result<Tensor> {
        let (outer, size, inner) = if global_shape.rank() == 0 {
            (1, 1, 1)
        } else {
            global_shape.split_at_dim("rand_named_slice", dim)?
        };
        let len = range.end - range.start;
        let key = kernel::key(seed, name);
        let global = |o: usize| {
            let (a, rest) = (o / (len * inner), o % (len * inner));
            (a * size * inner + range.start * inner + rest) as u64
        };
        let n = outer * len * inner;
        let data = match dist {
            InitDist::Normal { std } => {
                kernel::fill(n, global, |i| (kernel::normal(key, i) * std as f64) as f32)
            }
            InitDist::Uniform { lo, hi } => kernel::fill(n, global, |i| {
                (lo as f64 + (hi as f64 - lo as f64) * kernel::uniform(key, i)) as f32
            }),
        };
        let mut shape = global_shape.to_vec();
        if let Some(s) = shape.get_mut(dim) {
            *s = len;
        }
        Ok(Tensor::cpu_f32_from(data, shape))
    }
}
