//! The CPU implementation of the [`Backend`](crate::backend::Backend) kernel families: glue
//! from validated tensors to the slice kernels of `cpu/<family>.rs` (one file per group of
//! families). Element ids are checked here, on the host, before any kernel runs.

mod attention;
mod capacity;
mod elementwise;
mod host;
pub(crate) mod index;
mod matmul;
mod norm;
mod reduce;
mod rng;
mod routing;
mod small;
mod softmax;
