//! safetensors files: save and load named tensors (F32, BF16, I32), for checkpoints,
//! fixtures and `megamoe probe`.

use std::path::Path;

use safetensors::tensor::{Dtype as StDtype, SafeTensors, TensorView};

use crate::storage::CpuStorage;
use crate::{sync, DType, Device, Error, Result, Tensor};

fn st_dtype(d: DType) -> StDtype {
    match d {
        DType::F32 => StDtype::F32,
        DType::BF16 => StDtype::BF16,
        DType::I32 => StDtype::I32,
    }
}

/// Little-endian bytes of a tensor's elements (the caller counts the host read).
fn to_bytes(t: &Tensor) -> Result<Vec<u8>> {
    Ok(match t.backend().to_host(t)? {
        CpuStorage::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        CpuStorage::BF16(v) => v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect(),
        CpuStorage::I32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    })
}

/// Writes `tensors` to `path` in safetensors format (names must be unique).
///
/// SYNC: reads every tensor to the host; counts one host read for the whole file.
pub fn save_safetensors(path: impl AsRef<Path>, tensors: &[(&str, &Tensor)]) -> Result<()> {
    let path = path.as_ref();
    let shown = path.display().to_string();
    sync::record_host_read();
    let bytes = tensors
        .iter()
        .map(|(n, t)| {
            Ok((
                n.to_string(),
                st_dtype(t.dtype()),
                t.dims().to_vec(),
                to_bytes(t)?,
            ))
        })
        .collect::<Result<Vec<(String, StDtype, Vec<usize>, Vec<u8>)>>>()?;
    let mut views = Vec::with_capacity(bytes.len());
    for (name, dtype, shape, data) in &bytes {
        let view =
            TensorView::new(*dtype, shape.clone(), data).map_err(|source| Error::SafeTensors {
                path: shown.clone(),
                source,
            })?;
        views.push((name.clone(), view));
    }
    let out =
        safetensors::tensor::serialize(views, &None).map_err(|source| Error::SafeTensors {
            path: shown.clone(),
            source,
        })?;
    std::fs::write(path, out).map_err(|source| Error::Io {
        path: shown,
        source,
    })
}

/// Reads every tensor of a safetensors file onto the CPU, sorted by name.
pub fn load_safetensors(path: impl AsRef<Path>) -> Result<Vec<(String, Tensor)>> {
    let path = path.as_ref();
    let shown = path.display().to_string();
    let raw = std::fs::read(path).map_err(|source| Error::Io {
        path: shown.clone(),
        source,
    })?;
    let st = SafeTensors::deserialize(&raw).map_err(|source| Error::SafeTensors {
        path: shown.clone(),
        source,
    })?;
    let mut out = Vec::new();
    for (name, view) in st.tensors() {
        let data = view.data();
        let shape = view.shape().to_vec();
        let t = match view.dtype() {
            StDtype::F32 => Tensor::from_vec_f32(
                data.chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
                shape,
                Device::Cpu,
            )?,
            StDtype::BF16 => Tensor::from_vec_bf16(
                data.chunks_exact(2)
                    .map(|b| half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]])))
                    .collect(),
                shape,
                Device::Cpu,
            )?,
            StDtype::I32 => Tensor::from_vec_i32(
                data.chunks_exact(4)
                    .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
                shape,
                Device::Cpu,
            )?,
            other => {
                return Err(Error::UnsupportedFileDType {
                    path: shown,
                    name,
                    dtype: format!("{other:?}"),
                });
            }
        };
        out.push((name, t));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}
