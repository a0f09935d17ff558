//! Element types. Math is always f32; `BF16` is a storage format (widened to f32 when an op
//! reads it), `I32` holds indices (top-k experts, permutations, targets).

use std::fmt;

/// Element type of a tensor's storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// 32-bit IEEE float; the dtype of every op's floating-point output.
    F32,
    /// bfloat16 storage; ops widen it to f32 on read.
    BF16,
    /// 32-bit signed integer, for index tensors.
    I32,
}

impl DType {
    /// Bytes per element.
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::BF16 => 2,
        }
    }

    /// True for `F32` and `BF16`.
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::BF16)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::I32 => "i32",
        };
        f.write_str(s)
    }
}
