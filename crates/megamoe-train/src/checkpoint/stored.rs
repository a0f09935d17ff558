//! How a checkpoint file stores a tensor's values: little-endian f32, or bf16 for values
//! that are bf16 (AdamW's bf16 moments, `optim.moment_dtype = "bf16"`), named as
//! safetensors names them (`F32`, `BF16`).

use megamoe_tensor::DType;

/// `F32`: what a piece is stored as unless it says otherwise (every file written before
/// bf16 moments existed).
pub(crate) fn f32_name() -> String {
    "F32".to_string()
}

/// The safetensors name of a stored element type: `F32` or `BF16`.
pub fn stored_dtype(d: DType) -> String {
    match d {
        DType::BF16 => "BF16".to_string(),
        _ => f32_name(),
    }
}

/// Bytes per element and tensor dtype of a stored element type, `None` if unsupported.
pub(crate) fn stored_size(name: &str) -> Option<(usize, DType)> {
    match name {
        "F32" => Some((4, DType::F32)),
        "BF16" => Some((2, DType::BF16)),
        _ => None,
    }
}

/// Little-endian f32 (`size` 4) or bf16 (`size` 2, widened exactly) values as f32.
pub(crate) fn decode_values(bytes: &[u8], size: usize) -> Vec<f32> {
    if size == 2 {
        bytes
            .chunks_exact(2)
            .map(|c| f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16))
            .collect()
    } else {
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }
}
