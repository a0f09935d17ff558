//! Kernels behind megamoe-tensor's op families, for a tensor backend: casts and fills,
//! elementwise unary / binary ops with row, column and scalar broadcasts, 0/1 masks and
//! selects, integer sums and prefix sums, row and column reductions, row softmax and
//! log-softmax with their backward, top-k, row gather, per-row column gather / scatter,
//! deterministic row scatter-add and the general permute copy; and ([`RouteKernels`]) the
//! MoE routing, capacity and static expert-buffer kernels, with index checks in every build;
//! and ([`GroupKernels`]) the row-group copies around strided-batched grouped GEMMs.
//!
//! The API is raw: device addresses with a run-time element type ([`Dev`]) and sizes; the
//! caller (a backend that already checked shapes, dtypes and buffer sizes) guarantees the
//! addresses, so the launching methods are `unsafe`. Semantics are megamoe-tensor's CPU
//! kernels of the same names (`tests/tensor_parity.rs`); math is f32, sums f64, fixed
//! order (no float atomics): bitwise reproducible.

mod buffers;
mod groups;
mod launch;
mod router;
mod routing;

pub use groups::GroupKernels;
pub use launch::TensorKernels;
pub use router::{RouteLossArgs, RouteOut, RouteScoreFn, RouteShape, ROUTE_MAX_K, ROUTE_MAX_POOL};
pub use routing::{RouteError, RouteKernels, MAX_GROUPS, MAX_SLOTS};

/// 1 when rows of `f` elements at these addresses take a kernel's 8-wide path (its `vec`
/// argument: 16-byte accesses of 8 consecutive elements): `f` a multiple of 8 and every base
/// 16-byte aligned (then each 8-element group is, in f32 and in bf16); else 0.
fn vec8(f: usize, ptrs: &[u64]) -> i32 {
    i32::from(f.is_multiple_of(8) && ptrs.iter().all(|p| p.is_multiple_of(16)))
}

/// Element type of a device buffer, as the kernels see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dtype {
    /// IEEE single.
    F32,
    /// bfloat16.
    Bf16,
    /// 32-bit signed integer.
    I32,
}

impl Dtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::Bf16 => 2,
        }
    }

    fn code(self) -> i32 {
        match self {
            Dtype::F32 => 0,
            Dtype::Bf16 => 1,
            Dtype::I32 => 2,
        }
    }
}

/// A device address with the element type stored there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dev {
    /// Device address of element 0.
    pub ptr: u64,
    /// Element type.
    pub dtype: Dtype,
}

impl Dev {
    /// `ptr` holding `dtype` elements.
    pub fn new(ptr: u64, dtype: Dtype) -> Dev {
        Dev { ptr, dtype }
    }

    /// f32 elements at `ptr`.
    pub fn f32(ptr: u64) -> Dev {
        Dev::new(ptr, Dtype::F32)
    }

    /// i32 elements at `ptr`.
    pub fn i32(ptr: u64) -> Dev {
        Dev::new(ptr, Dtype::I32)
    }
}

/// One-input elementwise op (megamoe-tensor's `UnaryOp`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Unary {
    /// `-x`
    Neg,
    /// `|x|`
    Abs,
    /// `eˣ`
    Exp,
    /// natural log
    Log,
    /// `√x`
    Sqrt,
    /// `1/x`
    Recip,
    /// `x²`
    Square,
    /// logistic sigmoid
    Sigmoid,
    /// `tanh x`
    Tanh,
    /// `x σ(x)`
    Silu,
    /// exact GELU (erf in f64)
    GeluErf,
    /// tanh-approximate GELU
    GeluTanh,
    /// `max(x, 0)`
    Relu,
    /// `max(x, 0)²`
    Relu2,
    /// `x·mul + add`
    Affine {
        /// factor
        mul: f32,
        /// offset
        add: f32,
    },
}

impl Unary {
    fn code(self) -> (i32, f32, f32) {
        let c = match self {
            Unary::Neg => 0,
            Unary::Abs => 1,
            Unary::Exp => 2,
            Unary::Log => 3,
            Unary::Sqrt => 4,
            Unary::Recip => 5,
            Unary::Square => 6,
            Unary::Sigmoid => 7,
            Unary::Tanh => 8,
            Unary::Silu => 9,
            Unary::GeluErf => 10,
            Unary::GeluTanh => 11,
            Unary::Relu => 12,
            Unary::Relu2 => 13,
            Unary::Affine { mul, add } => return (14, mul, add),
        };
        (c, 1.0, 0.0)
    }
}

/// Two-input elementwise op (megamoe-tensor's `BinaryOp`); the backward ops take the
/// forward input (or output for sigmoid / tanh) as `a` and `dy` as `b`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binary {
    /// `a + b`
    Add,
    /// `a − b`
    Sub,
    /// `a · b`
    Mul,
    /// `a / b`
    Div,
    /// `max(a, b)`
    Maximum,
    /// `min(a, b)`
    Minimum,
    /// `dy · silu'(x)`
    SiluBackward,
    /// `dy · gelu'(x)`, exact form
    GeluErfBackward,
    /// `dy · gelu_tanh'(x)`
    GeluTanhBackward,
    /// `dy · y(1−y)`
    SigmoidBackward,
    /// `dy · (1−y²)`
    TanhBackward,
    /// `dy · [x > 0]`
    ReluBackward,
    /// `dy · 2 max(x, 0)`
    Relu2Backward,
    /// `silu(a) · b` (SwiGLU with gate `a`, up `b`)
    Swiglu,
}

impl Binary {
    fn code(self) -> i32 {
        match self {
            Binary::Add => 0,
            Binary::Sub => 1,
            Binary::Mul => 2,
            Binary::Div => 3,
            Binary::Maximum => 4,
            Binary::Minimum => 5,
            Binary::SiluBackward => 6,
            Binary::GeluErfBackward => 7,
            Binary::GeluTanhBackward => 8,
            Binary::SigmoidBackward => 9,
            Binary::TanhBackward => 10,
            Binary::ReluBackward => 11,
            Binary::Relu2Backward => 12,
            Binary::Swiglu => 13,
        }
    }
}

/// How `b` of a binary op is indexed for output element `i` of rows of length `h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Broadcast {
    /// `b[i]` (same shape).
    None,
    /// `b[i mod h]`: one value per column (`add_row`, `mul_row`).
    Row(usize),
    /// `b[i / h]`: one value per row (`mul_col`, `scale_rows`).
    Col(usize),
    /// `b[0]` (`scale_by` a one-element tensor).
    Scalar,
}

/// Per-row reduction over the last dimension, f32 result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowReduce {
    /// Σ
    Sum,
    /// Σ / len
    Mean,
    /// max (NaN-ignoring; −∞ for an empty row)
    Max,
    /// `log Σ exp`
    LogSumExp,
    /// Σ x²
    SumSquares,
    /// √(Σ x²)
    Norm,
}

impl RowReduce {
    fn code(self) -> i32 {
        match self {
            RowReduce::Sum => 0,
            RowReduce::Mean => 1,
            RowReduce::Max => 2,
            RowReduce::LogSumExp => 3,
            RowReduce::SumSquares => 4,
            RowReduce::Norm => 5,
        }
    }
}

/// Reduction of every element to one f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllReduce {
    /// Σ (0 when empty)
    Sum,
    /// Σ / n (NaN when empty)
    Mean,
    /// Σ x²
    SumSquares,
    /// √(Σ x²)
    Norm,
}
