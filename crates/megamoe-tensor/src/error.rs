//! Typed errors of the tensor crate: every variant names the op and the offending shapes,
//! dtypes or values.

use crate::{DType, Device};

/// Result alias of the tensor crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Every failure an op, constructor or IO function of this crate can report.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    // ---- shape ----
    /// Two operands whose shapes must agree do not.
    #[error("{op}: shape mismatch, lhs {lhs:?} vs rhs {rhs:?} ({rule})")]
    ShapeMismatch {
        /// Op name.
        op: &'static str,
        /// First operand's shape.
        lhs: Vec<usize>,
        /// Second operand's shape.
        rhs: Vec<usize>,
        /// What should have held.
        rule: &'static str,
    },
    /// An operand has the wrong number of dimensions.
    #[error("{op}: `{arg}` must have rank {expected}, got shape {got:?}")]
    RankMismatch {
        /// Op name.
        op: &'static str,
        /// Argument name.
        arg: &'static str,
        /// Expected rank.
        expected: usize,
        /// Actual shape.
        got: Vec<usize>,
    },
    /// A buffer's length does not match the product of the requested shape.
    #[error("{op}: shape {shape:?} needs {expected} elements, got {got}")]
    ElementCount {
        /// Op name.
        op: &'static str,
        /// Requested shape.
        shape: Vec<usize>,
        /// Product of the shape.
        expected: usize,
        /// Elements supplied.
        got: usize,
    },
    /// An index tensor holds a value outside `[0, bound)`.
    #[error("{op}: index {index} at position {position} is out of range 0..{bound}")]
    IndexOutOfRange {
        /// Op name.
        op: &'static str,
        /// The offending index value.
        index: i64,
        /// Flat position of the value in the index tensor.
        position: usize,
        /// Exclusive upper bound.
        bound: usize,
    },
    /// A scalar argument breaks the op's rule (e.g. `k > E` in top-k).
    #[error("{op}: {arg}={value} invalid: {rule}")]
    InvalidArgument {
        /// Op name.
        op: &'static str,
        /// Argument name.
        arg: &'static str,
        /// The value given, formatted.
        value: String,
        /// The rule it breaks.
        rule: &'static str,
    },

    // ---- dtype ----
    /// An operand has a dtype the op does not accept.
    #[error("{op}: `{arg}` has dtype {got}, expected {expected}")]
    DTypeMismatch {
        /// Op name.
        op: &'static str,
        /// Argument name.
        arg: &'static str,
        /// Accepted dtype(s), in words.
        expected: &'static str,
        /// Actual dtype.
        got: DType,
    },

    // ---- device ----
    /// The requested device is not compiled into this build (or does not exist).
    #[error("device {device} is not available: {reason}")]
    DeviceNotAvailable {
        /// The device asked for.
        device: Device,
        /// Why (e.g. "build has no feature `cuda`").
        reason: &'static str,
    },
    /// A CUDA call failed (feature `cuda`): no driver or GPU, out of memory, a kernel error.
    #[error("{op} on {device}: {message}")]
    Cuda {
        /// Op name.
        op: &'static str,
        /// The GPU.
        device: Device,
        /// The CUDA engine's error.
        message: String,
    },
    /// Operands live on different devices.
    #[error("{op}: operands on different devices, {lhs} vs {rhs}")]
    DeviceMismatch {
        /// Op name.
        op: &'static str,
        /// First operand's device.
        lhs: Device,
        /// Second operand's device.
        rhs: Device,
    },

    /// A CPU kernel was handed storage of another backend (never copied implicitly).
    #[error("{op}: needs CPU storage, the tensor is on {device}")]
    NotOnCpu {
        /// Op name.
        op: &'static str,
        /// The tensor's device.
        device: Device,
    },

    // ---- io ----
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// File path.
        path: String,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A safetensors file is malformed (bad header, truncated data, ...).
    #[error("{path}: invalid safetensors file: {source}")]
    SafeTensors {
        /// File path.
        path: String,
        /// Underlying error.
        #[source]
        source: safetensors::SafeTensorError,
    },
    /// A safetensors file holds a tensor whose dtype megamoe does not support.
    #[error("{path}: tensor `{name}` has dtype {dtype}, supported are F32, BF16, I32")]
    UnsupportedFileDType {
        /// File path.
        path: String,
        /// Tensor name in the file.
        name: String,
        /// The file's dtype, formatted.
        dtype: String,
    },
}
