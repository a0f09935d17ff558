//! Elementwise ops: arithmetic, activations and their backward helpers, fused SwiGLU, row
//! and column broadcasts, in-place accumulation.
//!
//! Every op is named by a [`UnaryOp`] or [`BinaryOp`] value, so a backend implements one
//! kernel per enum (the CPU formulas in `cpu/elementwise.rs` are the spec). Backward helpers
//! take the forward input `x` (or output `y` where cheaper: sigmoid, tanh) and the upstream
//! gradient `dy`, and return `dx`, written fresh.

use crate::{Error, Result, Tensor};

/// The elementwise kernel family of a [`Backend`](crate::backend::Backend) (see
/// [`Tensor::unary`] and the other ops of this module for the semantics).
pub trait ElementwiseKernels {
    /// `op(x)` elementwise, f32 result of `x`'s shape.
    fn unary(&self, x: &Tensor, op: UnaryOp) -> Result<Tensor>;
    /// `op(a, b)` elementwise on equal shapes, f32 result.
    fn binary(&self, a: &Tensor, b: &Tensor, op: BinaryOp) -> Result<Tensor>;
    /// `silu(gate) · up` on equal shapes.
    fn swiglu(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor>;
    /// `(d gate, d up)` of [`ElementwiseKernels::swiglu`].
    fn swiglu_backward(&self, gate: &Tensor, up: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)>;
    /// SwiGLU of gate‖up rows: `gate_up [.., 2F]` → `silu(gate) · up` `[.., F]`, the gate
    /// being the first F columns of each row, the up projection the last F.
    fn swiglu_gate_up(&self, gate_up: &Tensor) -> Result<Tensor>;
    /// `d gate_up [.., 2F]` (f32) of [`ElementwiseKernels::swiglu_gate_up`] from `dy [.., F]`.
    fn swiglu_gate_up_backward(&self, gate_up: &Tensor, dy: &Tensor) -> Result<Tensor>;
    /// `op(x[.., h], v[h])` with `v [H]` broadcast over the rows of `x [.., H]`.
    fn row_broadcast(&self, x: &Tensor, v: &Tensor, op: RowOp) -> Result<Tensor>;
    /// `x[n, ..] · s[n]` for `x [N, ..]`, `s [N]`.
    fn scale_rows(&self, x: &Tensor, s: &Tensor) -> Result<Tensor>;
    /// In place `dst += alpha · x` (equal shapes; `dst` becomes f32).
    fn axpy(&self, dst: &mut Tensor, alpha: f32, x: &Tensor) -> Result<()>;
    /// In place: every element of `dst` set to `value` (`dst` becomes f32).
    fn fill(&self, dst: &mut Tensor, value: f32) -> Result<()>;
}

/// The op of a row broadcast ([`ElementwiseKernels::row_broadcast`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowOp {
    /// `x + v` (bias add).
    Add,
    /// `x · v` (norm weight).
    Mul,
}

/// A one-input elementwise op.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub enum UnaryOp {
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
    /// `σ(x) = 1/(1+e⁻ˣ)`
    Sigmoid,
    /// `tanh x`
    Tanh,
    /// `x σ(x)`
    Silu,
    /// exact GELU `½x(1+erf(x/√2))`
    GeluErf,
    /// tanh-approximate GELU
    GeluTanh,
    /// `max(x, 0)`
    Relu,
    /// `max(x, 0)²` (squared ReLU, Primer)
    Relu2,
    /// `x·mul + add`
    Affine {
        /// factor
        mul: f32,
        /// offset
        add: f32,
    },
}

impl UnaryOp {
    pub(crate) fn name(self) -> &'static str {
        match self {
            UnaryOp::Neg => "neg",
            UnaryOp::Abs => "abs",
            UnaryOp::Exp => "exp",
            UnaryOp::Log => "log",
            UnaryOp::Sqrt => "sqrt",
            UnaryOp::Recip => "recip",
            UnaryOp::Square => "square",
            UnaryOp::Sigmoid => "sigmoid",
            UnaryOp::Tanh => "tanh",
            UnaryOp::Silu => "silu",
            UnaryOp::GeluErf => "gelu",
            UnaryOp::GeluTanh => "gelu_tanh",
            UnaryOp::Relu => "relu",
            UnaryOp::Relu2 => "relu2",
            UnaryOp::Affine { .. } => "affine",
        }
    }
}

/// A two-input elementwise op on equal shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BinaryOp {
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
    /// `(x, dy) ↦ dy · silu'(x)`
    SiluBackward,
    /// `(x, dy) ↦ dy · gelu'(x)` (exact form)
    GeluErfBackward,
    /// `(x, dy) ↦ dy · gelu_tanh'(x)`
    GeluTanhBackward,
    /// `(y, dy) ↦ dy · y(1−y)` with `y = σ(x)`
    SigmoidBackward,
    /// `(y, dy) ↦ dy · (1−y²)` with `y = tanh x`
    TanhBackward,
    /// `(x, dy) ↦ dy · [x > 0]`
    ReluBackward,
    /// `(x, dy) ↦ dy · 2 max(x, 0)`
    Relu2Backward,
}

impl BinaryOp {
    pub(crate) fn name(self) -> &'static str {
        match self {
            BinaryOp::Add => "add",
            BinaryOp::Sub => "sub",
            BinaryOp::Mul => "mul",
            BinaryOp::Div => "div",
            BinaryOp::Maximum => "maximum",
            BinaryOp::Minimum => "minimum",
            BinaryOp::SiluBackward => "silu_backward",
            BinaryOp::GeluErfBackward => "gelu_backward",
            BinaryOp::GeluTanhBackward => "gelu_tanh_backward",
            BinaryOp::SigmoidBackward => "sigmoid_backward",
            BinaryOp::TanhBackward => "tanh_backward",
            BinaryOp::ReluBackward => "relu_backward",
            BinaryOp::Relu2Backward => "relu2_backward",
        }
    }
}

impl Tensor {
    /// Applies `op` to every element; result f32 of the same shape.
    pub fn unary(&self, op: UnaryOp) -> Result<Tensor> {
        self.backend().unary(self, op)
    }

    /// Applies `op` to equal-shaped `self` and `rhs`.
    pub fn binary(&self, rhs: &Tensor, op: BinaryOp) -> Result<Tensor> {
        let name = op.name();
        self.same_shape(name, rhs)?;
        self.backend().binary(self, rhs, op)
    }

    /// `self + rhs` (equal shapes).
    pub fn add(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(rhs, BinaryOp::Add)
    }
    /// `self − rhs` (equal shapes).
    pub fn sub(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(rhs, BinaryOp::Sub)
    }
    /// `self · rhs` elementwise (equal shapes).
    pub fn mul(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(rhs, BinaryOp::Mul)
    }
    /// `self / rhs` elementwise (equal shapes).
    pub fn div(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(rhs, BinaryOp::Div)
    }
    /// Elementwise maximum.
    pub fn maximum(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(rhs, BinaryOp::Maximum)
    }
    /// Elementwise minimum.
    pub fn minimum(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(rhs, BinaryOp::Minimum)
    }
    /// `self · s`.
    pub fn scale(&self, s: f32) -> Result<Tensor> {
        self.unary(UnaryOp::Affine { mul: s, add: 0.0 })
    }
    /// `self + c`.
    pub fn add_scalar(&self, c: f32) -> Result<Tensor> {
        self.unary(UnaryOp::Affine { mul: 1.0, add: c })
    }
    /// `self · mul + add`.
    pub fn affine(&self, mul: f32, add: f32) -> Result<Tensor> {
        self.unary(UnaryOp::Affine { mul, add })
    }
    /// `−self`.
    pub fn neg(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Neg)
    }
    /// `|self|`.
    pub fn abs(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Abs)
    }
    /// `e^self`.
    pub fn exp(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Exp)
    }
    /// Natural log.
    pub fn log(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Log)
    }
    /// Square root.
    pub fn sqrt(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Sqrt)
    }
    /// `1/self`.
    pub fn recip(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Recip)
    }
    /// `self²`.
    pub fn square(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Square)
    }
    /// Logistic sigmoid.
    pub fn sigmoid(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Sigmoid)
    }
    /// Hyperbolic tangent.
    pub fn tanh(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Tanh)
    }
    /// SiLU (swish) `x σ(x)`.
    pub fn silu(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Silu)
    }
    /// Exact GELU `½x(1+erf(x/√2))` (PyTorch `gelu(approximate="none")`).
    pub fn gelu(&self) -> Result<Tensor> {
        self.unary(UnaryOp::GeluErf)
    }
    /// Tanh-approximate GELU (PyTorch `gelu(approximate="tanh")`).
    pub fn gelu_tanh(&self) -> Result<Tensor> {
        self.unary(UnaryOp::GeluTanh)
    }
    /// `max(x, 0)`.
    pub fn relu(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Relu)
    }
    /// Squared ReLU `max(x, 0)²`.
    pub fn relu2(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Relu2)
    }

    /// `dx = dy · silu'(x)`; `self` is the forward input `x`.
    pub fn silu_backward(&self, dy: &Tensor) -> Result<Tensor> {
        self.binary(dy, BinaryOp::SiluBackward)
    }
    /// `dx = dy · gelu'(x)` (exact GELU); `self` is `x`.
    pub fn gelu_backward(&self, dy: &Tensor) -> Result<Tensor> {
        self.binary(dy, BinaryOp::GeluErfBackward)
    }
    /// `dx = dy · gelu_tanh'(x)`; `self` is `x`.
    pub fn gelu_tanh_backward(&self, dy: &Tensor) -> Result<Tensor> {
        self.binary(dy, BinaryOp::GeluTanhBackward)
    }
    /// `dx = dy · y(1−y)`; `self` is the forward OUTPUT `y = σ(x)`.
    pub fn sigmoid_backward(&self, dy: &Tensor) -> Result<Tensor> {
        self.binary(dy, BinaryOp::SigmoidBackward)
    }
    /// `dx = dy · (1−y²)`; `self` is the forward OUTPUT `y = tanh x`.
    pub fn tanh_backward(&self, dy: &Tensor) -> Result<Tensor> {
        self.binary(dy, BinaryOp::TanhBackward)
    }
    /// `dx = dy · [x > 0]`; `self` is `x`.
    pub fn relu_backward(&self, dy: &Tensor) -> Result<Tensor> {
        self.binary(dy, BinaryOp::ReluBackward)
    }
    /// `dx = dy · 2 max(x, 0)`; `self` is `x`.
    pub fn relu2_backward(&self, dy: &Tensor) -> Result<Tensor> {
        self.binary(dy, BinaryOp::Relu2Backward)
    }

    /// Fused SwiGLU `silu(gate) · up` (equal shapes; `self` is `gate`).
    pub fn swiglu(&self, up: &Tensor) -> Result<Tensor> {
        const OP: &str = "swiglu";
        self.same_shape(OP, up)?;
        self.backend().swiglu(self, up)
    }

    /// Backward of [`Tensor::swiglu`]: returns `(d_gate, d_up)`, written fresh.
    pub fn swiglu_backward(gate: &Tensor, up: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
        const OP: &str = "swiglu_backward";
        gate.same_shape(OP, up)?;
        gate.same_shape(OP, dy)?;
        gate.backend().swiglu_backward(gate, up, dy)
    }

    /// SwiGLU of gate‖up rows: `self [.., 2F]` holds in each row the gate (first F columns)
    /// and the up projection (last F) — the output of ONE GEMM against a fused `[2F, H]`
    /// weight — and the result `[.., F]` is `silu(gate) · up`, per element the bits of
    /// [`Tensor::swiglu`] on the two halves (no copy of either half).
    pub fn swiglu_gate_up(&self) -> Result<Tensor> {
        check_gate_up("swiglu_gate_up", self)?;
        self.backend().swiglu_gate_up(self)
    }

    /// Backward of [`Tensor::swiglu_gate_up`]: `d_gate_up [.., 2F]`, written fresh, holding in
    /// each row the `(d_gate, d_up)` of [`Tensor::swiglu_backward`] side by side.
    pub fn swiglu_gate_up_backward(gate_up: &Tensor, dy: &Tensor) -> Result<Tensor> {
        const OP: &str = "swiglu_gate_up_backward";
        check_gate_up(OP, gate_up)?;
        gate_up.same_device(OP, dy)?;
        if dy.dims() != gate_up_half(gate_up).1.dims() {
            return Err(Error::ShapeMismatch {
                op: OP,
                lhs: gate_up.dims().to_vec(),
                rhs: dy.dims().to_vec(),
                rule: "dy must have gate_up's shape with the last dimension halved",
            });
        }
        gate_up.backend().swiglu_gate_up_backward(gate_up, dy)
    }

    /// `x + b` with `b [H]` broadcast over every row of `x [.., H]` (bias add).
    pub fn add_row(&self, b: &Tensor) -> Result<Tensor> {
        self.row_broadcast("add_row", b, RowOp::Add)
    }

    /// `x · s` with `s [H]` broadcast over every row of `x [.., H]` (norm weight).
    pub fn mul_row(&self, s: &Tensor) -> Result<Tensor> {
        self.row_broadcast("mul_row", s, RowOp::Mul)
    }

    /// `x[n, ..] · s[n]`: row `n` of `x [N, ..]` scaled by `s [N]` (gate weights).
    pub fn mul_col(&self, s: &Tensor) -> Result<Tensor> {
        const OP: &str = "mul_col";
        self.same_device(OP, s)?;
        let n = self.dims().first().copied().unwrap_or(1);
        if s.dims() != [n] || self.rank() == 0 {
            return Err(Error::ShapeMismatch {
                op: OP,
                lhs: self.dims().to_vec(),
                rhs: s.dims().to_vec(),
                rule: "s must be [N] for x [N, ..]",
            });
        }
        self.backend().scale_rows(self, s)
    }

    /// Alias of [`Tensor::mul_col`].
    pub fn scale_rows(&self, s: &Tensor) -> Result<Tensor> {
        self.mul_col(s)
    }

    fn row_broadcast(&self, op: &'static str, v: &Tensor, row_op: RowOp) -> Result<Tensor> {
        self.same_device(op, v)?;
        let h = self.dims().last().copied().unwrap_or(1);
        if v.dims() != [h] || self.rank() == 0 {
            return Err(Error::ShapeMismatch {
                op,
                lhs: self.dims().to_vec(),
                rhs: v.dims().to_vec(),
                rule: "the row vector must be [H] for x [.., H]",
            });
        }
        self.backend().row_broadcast(self, v, row_op)
    }

    /// In place `self += other` (equal shapes). Copy-on-write if the buffer is shared; a bf16
    /// `self` becomes f32.
    pub fn add_assign(&mut self, other: &Tensor) -> Result<()> {
        self.axpy(1.0, other)
    }

    /// In place `self += alpha · x` (equal shapes). Copy-on-write if the buffer is shared.
    pub fn axpy(&mut self, alpha: f32, x: &Tensor) -> Result<()> {
        const OP: &str = "axpy";
        self.same_shape(OP, x)?;
        let x = self.unaliased(x)?;
        self.backend().axpy(self, alpha, &x)
    }

    /// In place: `self`'s elements become `src`'s (equal shapes), bit for bit (signed zeros
    /// and NaNs included): the way to load values into a write-through view without
    /// replacing the handle. Copy-on-write if the buffer is shared (not write-through).
    pub fn copy_from(&mut self, src: &Tensor) -> Result<()> {
        // −0 is the additive identity of IEEE addition (x + −0 = x for every x, ±0 included).
        self.same_shape("copy_from", src)?;
        self.fill_in_place(-0.0)?;
        self.axpy(1.0, src)
    }

    /// In place: every element set to `value`. The buffer is reused when the handle is
    /// unique (a persistent gradient buffer is zeroed without reallocating); copy-on-write
    /// otherwise; a bf16 `self` becomes f32.
    pub fn fill_in_place(&mut self, value: f32) -> Result<()> {
        self.backend().fill(self, value)
    }
}

/// A gate‖up operand has rank ≥ 1 and an even last dimension.
fn check_gate_up(op: &'static str, t: &Tensor) -> Result<()> {
    match t.dims().last() {
        Some(n) if n % 2 == 0 => Ok(()),
        _ => Err(Error::InvalidArgument {
            op,
            arg: "gate_up",
            value: format!("{:?}", t.dims()),
            rule: "the last dimension holds the gate and up halves, so it must be even",
        }),
    }
}

/// `(F, shape of the result)` of a checked gate‖up operand `[.., 2F]`.
pub(crate) fn gate_up_half(t: &Tensor) -> (usize, crate::Shape) {
    let mut dims = t.dims().to_vec();
    let f = dims.last().map_or(0, |n| n / 2);
    if let Some(last) = dims.last_mut() {
        *last = f;
    }
    (f, dims.into())
}
