//! The bytes of one MPI message: a header naming the operation, the tensor's dtype and
//! shape and the op's numbers (reduce op, root, counts, split group), then the tensor's
//! elements (little-endian). The receiver checks the header against what it expects, so a
//! rank that called another collective, or passed another shape, is a
//! [`CommError::Mismatch`] naming it, as with thread ranks.

use megamoe_tensor::{bf16, DType, Device, Tensor};

use crate::error::{CommError, Result};

const MAGIC: u64 = 0x6d65_6761_6d6f_6531; // "megamoe1"

/// The operations, by code (index).
pub(crate) const OPS: [&str; 8] = [
    "all_reduce",
    "all_gather",
    "reduce_scatter",
    "all_to_all_v",
    "broadcast",
    "send",
    "barrier",
    "split",
];

/// The code of `op` in [`OPS`].
pub(crate) fn op_code(op: &str) -> u64 {
    OPS.iter().position(|o| *o == op).unwrap_or(OPS.len()) as u64
}

/// A decoded message.
pub(crate) struct Message {
    pub(crate) op: u64,
    /// `None` for messages without a tensor (barrier, split).
    pub(crate) dtype: Option<DType>,
    pub(crate) dims: Vec<usize>,
    pub(crate) meta: Vec<usize>,
    pub(crate) payload: Vec<u8>,
}

fn dtype_code(d: Option<DType>) -> u64 {
    match d {
        None => 0,
        Some(DType::F32) => 1,
        Some(DType::BF16) => 2,
        Some(DType::I32) => 3,
    }
}

fn dtype_of(code: u64) -> Option<DType> {
    match code {
        1 => Some(DType::F32),
        2 => Some(DType::BF16),
        3 => Some(DType::I32),
        _ => None,
    }
}

/// The little-endian bytes of `t`'s elements (SYNC: reads the tensor on the host).
pub(crate) fn tensor_bytes(t: &Tensor) -> Result<Vec<u8>> {
    Ok(match t.dtype() {
        DType::F32 => t
            .to_host_f32()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::I32 => t
            .to_host_i32()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::BF16 => t
            .to_host_bf16()?
            .iter()
            .flat_map(|v| v.to_bits().to_le_bytes())
            .collect(),
    })
}

/// A tensor of `dtype` and `dims` on `device` from little-endian element bytes.
pub(crate) fn tensor_from_bytes(
    bytes: &[u8],
    dtype: DType,
    dims: &[usize],
    device: Device,
) -> Result<Tensor> {
    let dims = dims.to_vec();
    Ok(match dtype {
        DType::F32 => {
            let v = bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            Tensor::from_vec_f32(v, dims, device)?
        }
        DType::I32 => {
            let v = bytes
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            Tensor::from_vec_i32(v, dims, device)?
        }
        DType::BF16 => {
            let v = bytes
                .chunks_exact(2)
                .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])))
                .collect();
            Tensor::from_vec_bf16(v, dims, device)?
        }
    })
}

/// Encodes a message: `op`, the tensor (its dtype, shape and `payload` bytes) if any, `meta`.
pub(crate) fn encode(op: u64, tensor: Option<(DType, &[usize], &[u8])>, meta: &[usize]) -> Vec<u8> {
    let (dtype, dims, payload) = match tensor {
        Some((d, dims, p)) => (Some(d), dims, p),
        None => (None, &[][..], &[][..]),
    };
    let mut words = vec![MAGIC, op, dtype_code(dtype), dims.len() as u64];
    words.extend(dims.iter().map(|&d| d as u64));
    words.push(meta.len() as u64);
    words.extend(meta.iter().map(|&m| m as u64));
    let mut out = Vec::with_capacity(words.len() * 8 + payload.len());
    for w in words {
        out.extend_from_slice(&w.to_le_bytes());
    }
    out.extend_from_slice(payload);
    out
}

/// Decodes a message from world rank `from` (errors name it; `me` is the receiving rank).
pub(crate) fn decode(me: usize, from: usize, op: &'static str, bytes: Vec<u8>) -> Result<Message> {
    let bad = |what: &str| CommError::Mpi {
        rank: me,
        detail: format!("{op}: malformed message from rank {from}: {what}"),
    };
    let mut pos = 0;
    let mut word = || -> Result<u64> {
        let b = bytes
            .get(pos..pos + 8)
            .ok_or_else(|| bad("truncated header"))?;
        pos += 8;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    };
    if word()? != MAGIC {
        return Err(bad("not a megamoe message"));
    }
    let op_code = word()?;
    let dtype = dtype_of(word()?);
    let ndims = word()? as usize;
    if ndims > 64 {
        return Err(bad("too many dims"));
    }
    let dims = (0..ndims)
        .map(|_| word().map(|w| w as usize))
        .collect::<Result<Vec<_>>>()?;
    let nmeta = word()? as usize;
    if nmeta > 1 << 20 {
        return Err(bad("too many numbers"));
    }
    let meta = (0..nmeta)
        .map(|_| word().map(|w| w as usize))
        .collect::<Result<Vec<_>>>()?;
    let payload = bytes[pos..].to_vec();
    if let Some(d) = dtype {
        let want = dims.iter().product::<usize>() * d.size_in_bytes();
        if payload.len() != want {
            return Err(bad(&format!(
                "{} payload bytes for {dims:?} {d} (want {want})",
                payload.len()
            )));
        }
    }
    Ok(Message {
        op: op_code,
        dtype,
        dims,
        meta,
        payload,
    })
}

/// Checks `msg` (from world rank `from`) is the collective `op` this rank called.
pub(crate) fn check_op(
    me: usize,
    from: usize,
    seq: u64,
    op: &'static str,
    msg: &Message,
) -> Result<()> {
    if OPS.get(msg.op as usize).copied() == Some(op) {
        return Ok(());
    }
    let theirs = OPS
        .get(msg.op as usize)
        .copied()
        .unwrap_or("an unknown operation");
    Err(CommError::Mismatch {
        rank: me,
        op,
        detail: format!("collective #{seq}: this rank called {op} but rank {from} called {theirs}"),
    })
}

/// Checks `msg` carries a tensor of `dims` and `dtype` (`what` says which rows).
pub(crate) fn check_layout(
    me: usize,
    from: usize,
    op: &'static str,
    msg: &Message,
    dims: &[usize],
    dtype: DType,
) -> Result<()> {
    if msg.dtype == Some(dtype) && msg.dims == dims {
        return Ok(());
    }
    let theirs = msg.dtype.map_or("no tensor".to_string(), |d| d.to_string());
    Err(CommError::Mismatch {
        rank: me,
        op,
        detail: format!(
            "this rank passed {dims:?} {dtype} but rank {from} passed {:?} {theirs}",
            msg.dims
        ),
    })
}
