//! Shapes: a list of dimension sizes, row-major (last dimension contiguous).

use std::fmt;

use crate::{Error, Result};

/// Dimension sizes of a tensor, outermost first. A shape of rank 0 is a scalar (1 element).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Shape(Vec<usize>);

impl Shape {
    /// The dimension sizes.
    pub fn dims(&self) -> &[usize] {
        &self.0
    }

    /// Number of dimensions.
    pub fn rank(&self) -> usize {
        self.0.len()
    }

    /// Number of elements (product of dims; 1 for a scalar).
    pub fn numel(&self) -> usize {
        self.0.iter().product()
    }

    /// Size of dimension `dim`, or an error naming `op` if `dim >= rank`.
    pub fn dim(&self, op: &'static str, dim: usize) -> Result<usize> {
        self.0
            .get(dim)
            .copied()
            .ok_or_else(|| Error::InvalidArgument {
                op,
                arg: "dim",
                value: dim.to_string(),
                rule: "must be < the tensor's rank",
            })
    }

    /// `(outer, size, inner)` around `dim`: the tensor viewed as `[outer, size, inner]`.
    pub(crate) fn split_at_dim(
        &self,
        op: &'static str,
        dim: usize,
    ) -> Result<(usize, usize, usize)> {
        let size = self.dim(op, dim)?;
        let outer = self.0[..dim].iter().product();
        let inner = self.0[dim + 1..].iter().product();
        Ok((outer, size, inner))
    }

    /// The shape as a vector (for error messages and new shapes).
    pub fn to_vec(&self) -> Vec<usize> {
        self.0.clone()
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl From<Vec<usize>> for Shape {
    fn from(v: Vec<usize>) -> Self {
        Shape(v)
    }
}

impl From<&[usize]> for Shape {
    fn from(v: &[usize]) -> Self {
        Shape(v.to_vec())
    }
}

impl<const N: usize> From<[usize; N]> for Shape {
    fn from(v: [usize; N]) -> Self {
        Shape(v.to_vec())
    }
}

impl From<&Shape> for Shape {
    fn from(s: &Shape) -> Self {
        s.clone()
    }
}

impl From<usize> for Shape {
    fn from(n: usize) -> Self {
        Shape(vec![n])
    }
}

impl From<(usize, usize)> for Shape {
    fn from((a, b): (usize, usize)) -> Self {
        Shape(vec![a, b])
    }
}

impl From<(usize, usize, usize)> for Shape {
    fn from((a, b, c): (usize, usize, usize)) -> Self {
        Shape(vec![a, b, c])
    }
}
