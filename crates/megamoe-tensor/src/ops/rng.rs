//! Layout-invariant initialisation: tensors whose element values depend only on
//! `(seed, name, global element index)` (counter-based RNG, see `cpu/rng.rs`). A rank that
//! owns a slice of a parameter calls the `_slice` form and gets exactly that slice of the
//! tensor every other layout would build.

use std::ops::Range;

use crate::{Device, Error, Result, Shape, Tensor};

/// The named-initialisation kernel family of a [`Backend`](crate::backend::Backend).
pub trait RngKernels {
    /// Elements `range` of dimension `dim` of the tensor of `global_shape` whose element
    /// `i` (global row-major index) is drawn from `dist` by the counter RNG keyed by
    /// `(seed, name)`; f32 on this backend's device. `range` lies within the dimension
    /// (checked by the caller).
    fn rand_named_slice(
        &self,
        seed: u64,
        name: &str,
        global_shape: &Shape,
        dim: usize,
        range: Range<usize>,
        dist: InitDist,
    ) -> Result<Tensor>;
}

/// What each element is drawn from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum InitDist {
    /// `N(0, std²)`.
    Normal {
        /// Standard deviation.
        std: f32,
    },
    /// `U[lo, hi)`.
    Uniform {
        /// Lower bound (inclusive).
        lo: f32,
        /// Upper bound (exclusive up to f32 rounding).
        hi: f32,
    },
}

impl Tensor {
    /// `[global_shape]` tensor `name` drawn from `N(0, std²)`; element `i` (row-major) is a
    /// function of `(seed, name, i)` only.
    pub fn randn_named(
        seed: u64,
        name: &str,
        shape: impl Into<Shape>,
        std: f32,
        device: Device,
    ) -> Result<Tensor> {
        let shape = shape.into();
        let full = 0..shape.dims().first().copied().unwrap_or(1);
        Tensor::rand_named_slice(
            seed,
            name,
            &shape,
            0,
            full,
            InitDist::Normal { std },
            device,
        )
    }

    /// Rows `rows` (dim 0) of the `global_shape` tensor that [`Tensor::randn_named`] builds,
    /// bit-identical to narrowing the whole tensor.
    pub fn randn_named_rows(
        seed: u64,
        name: &str,
        global_shape: impl Into<Shape>,
        rows: Range<usize>,
        std: f32,
        device: Device,
    ) -> Result<Tensor> {
        Tensor::rand_named_slice(
            seed,
            name,
            &global_shape.into(),
            0,
            rows,
            InitDist::Normal { std },
            device,
        )
    }

    /// The slice `range` along dimension `dim` of the named global tensor drawn from `dist`
    /// (rows for FSDP/expert shards, columns for tensor-parallel shards). For a rank-0 shape
    /// use `dim = 0, range = 0..1`.
    pub fn rand_named_slice(
        seed: u64,
        name: &str,
        global_shape: &Shape,
        dim: usize,
        range: Range<usize>,
        dist: InitDist,
        device: Device,
    ) -> Result<Tensor> {
        const OP: &str = "rand_named_slice";
        let backend = crate::backend::backend_for(device)?;
        let (_, size, _) = if global_shape.rank() == 0 {
            (1, 1, 1)
        } else {
            global_shape.split_at_dim(OP, dim)?
        };
        if range.start > range.end || range.end > size {
            return Err(Error::InvalidArgument {
                op: OP,
                arg: "range",
                value: format!("{range:?}"),
                rule: "must lie within 0..size of dimension dim",
            });
        }
        backend.rand_named_slice(seed, name, global_shape, dim, range, dist)
    }
}
