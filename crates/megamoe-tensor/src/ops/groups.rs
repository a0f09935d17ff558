//! [`RowGroups`]: the row groups of a grouped GEMM (one group per expert), held as device
//! tensors so that no op needs them on the host.
//!
//! Group `g` covers rows `offsets[g] .. offsets[g] + sizes[g]` of the operand; groups are
//! in order and disjoint, and rows outside every group are not multiplied (their output
//! rows are zero). The operand's row count is the static bound, so shapes never depend on
//! the group sizes: a dropless buffer is `[R, H]` with packed groups
//! ([`RowGroups::packed`]), a static-capacity buffer `[G·C, H]` with group `g` at row `g·C`
//! ([`RowGroups::strided`]).

use crate::{DType, Device, Error, Result, Tensor};

/// Row groups `(sizes, offsets)`, both `[G]` i32 tensors on the operands' device.
#[derive(Debug, Clone)]
pub struct RowGroups {
    sizes: Tensor,
    offsets: Tensor,
    /// `Some(stride)` for [`RowGroups::strided`] groups (known on the host, so a backend
    /// can run one strided-batched GEMM over `[G, stride, ·]`).
    stride: Option<usize>,
    /// `(offset, size)` per group when the sizes came from the host
    /// ([`RowGroups::from_sizes`]): a device backend needs no read to know them.
    host: Option<std::sync::Arc<[(usize, usize)]>>,
    /// The caller's promise that the operands' rows outside every group are zero
    /// ([`RowGroups::with_zero_pad_rows`]).
    zero_pad_rows: bool,
}

fn check_sizes(op: &'static str, sizes: &Tensor) -> Result<usize> {
    sizes.expect_rank(op, "sizes", 1)?;
    if sizes.dtype() != DType::I32 {
        return Err(Error::DTypeMismatch {
            op,
            arg: "sizes",
            expected: "i32",
            got: sizes.dtype(),
        });
    }
    Ok(sizes.numel())
}

impl RowGroups {
    /// Consecutive groups: group `g` starts where group `g − 1` ends (offsets are the
    /// exclusive prefix sum of `sizes`, computed on the device). `sizes` is `[G]` i32.
    pub fn packed(sizes: &Tensor) -> Result<RowGroups> {
        check_sizes("RowGroups::packed", sizes)?;
        Ok(RowGroups {
            sizes: sizes.clone(),
            offsets: sizes.exclusive_cumsum_i32()?,
            stride: None,
            host: None,
            zero_pad_rows: false,
        })
    }

    /// [`RowGroups::packed`] whose sizes a device backend also gets on the host, read once
    /// here (SYNC on a GPU: one counted host read; on the CPU nothing is read, the CPU
    /// backend reads the sizes in place): a grouped GEMM that needs host group sizes (cuBLAS)
    /// then reads nothing, so a dropless MoE layer reads its counts once per layer instead
    /// of once per GEMM.
    pub fn packed_read(sizes: &Tensor) -> Result<RowGroups> {
        if sizes.device() == Device::Cpu {
            return RowGroups::packed(sizes);
        }
        let host = sizes.to_host_i32()?;
        RowGroups::packed_known(sizes, &host)
    }

    /// [`RowGroups::packed`] with the sizes' values already on the host (`host`, equal to
    /// `sizes`, e.g. the counts a dropless sort read to size its output): a device backend
    /// plans its grouped GEMMs from them and reads nothing. `host` must hold `sizes`'
    /// values; its length and signs are checked (named errors), its values are trusted.
    pub fn packed_known(sizes: &Tensor, host: &[i32]) -> Result<RowGroups> {
        const OP: &str = "RowGroups::packed_known";
        let mut groups = RowGroups::packed(sizes)?;
        if host.len() != groups.len() {
            return Err(Error::InvalidArgument {
                op: OP,
                arg: "host",
                value: format!("{} sizes for {} groups", host.len(), groups.len()),
                rule: "the host sizes must have one entry per group",
            });
        }
        if sizes.device() == Device::Cpu {
            // The CPU backend reads the sizes in place.
            return Ok(groups);
        }
        let mut spans = Vec::with_capacity(host.len());
        let mut offset = 0usize;
        for (g, &s) in host.iter().enumerate() {
            let s = usize::try_from(s).map_err(|_| Error::InvalidArgument {
                op: OP,
                arg: "sizes",
                value: format!("group {g}: {s}"),
                rule: "group sizes must be non-negative",
            })?;
            spans.push((offset, s));
            offset += s;
        }
        groups.host = Some(spans.into());
        Ok(groups)
    }

    /// Fixed-stride groups of a padded buffer `[G·stride, ..]`: group `g` starts at row
    /// `g·stride` and holds `sizes[g] ≤ stride` rows.
    pub fn strided(sizes: &Tensor, stride: usize) -> Result<RowGroups> {
        let g = check_sizes("RowGroups::strided", sizes)?;
        if g.checked_mul(stride).is_none_or(|n| n > i32::MAX as usize) {
            return Err(Error::InvalidArgument {
                op: "RowGroups::strided",
                arg: "stride",
                value: stride.to_string(),
                rule: "G·stride must fit in i32",
            });
        }
        // Shape-only: one device copy per (G, stride), no upload after the first.
        let offsets = (0..g).map(|i| (i * stride) as i32).collect();
        Ok(RowGroups {
            sizes: sizes.clone(),
            offsets: Tensor::constant_i32(offsets, [g], sizes.device())?,
            stride: Some(stride),
            host: None,
            zero_pad_rows: false,
        })
    }

    /// These groups with the caller's promise that every operand grouped by them holds
    /// zeros (finite weights assumed) in the rows outside every group — as the
    /// static-capacity expert buffers do: the permute writes zero pad rows, the combine
    /// backward writes zero pad-row gradients, and the expert bank's GEMMs and activations
    /// map zero rows to zero rows. A zero row contributes exact zeros to every product, so
    /// a backend may then skip the passes that enforce "rows outside the groups are not
    /// multiplied" (zeroing output pad rows, masking a copy of a weight-gradient operand)
    /// with identical results. Operands that break the promise give unspecified pad rows
    /// and weight gradients.
    pub fn with_zero_pad_rows(mut self) -> RowGroups {
        self.zero_pad_rows = true;
        self
    }

    /// Whether the caller promised zero pad rows ([`RowGroups::with_zero_pad_rows`]).
    pub fn zero_pad_rows(&self) -> bool {
        self.zero_pad_rows
    }

    /// Packed groups from host sizes (sizes that depend only on shapes, e.g. the shared
    /// experts' one group of all rows, reference paths and tests; routed experts build
    /// them from device counts with [`RowGroups::packed`]). Sizes and offsets are
    /// [`Tensor::constant_i32`]s: no upload after the first call with these sizes.
    pub fn from_sizes(sizes: &[usize], device: Device) -> Result<RowGroups> {
        const OP: &str = "RowGroups::from_sizes";
        let mut host = Vec::with_capacity(sizes.len());
        let mut offsets = Vec::with_capacity(sizes.len());
        let mut spans = Vec::with_capacity(sizes.len());
        let mut offset = 0usize;
        for &s in sizes {
            let fit = |v: usize| {
                i32::try_from(v).map_err(|_| Error::InvalidArgument {
                    op: OP,
                    arg: "sizes",
                    value: format!("{sizes:?}"),
                    rule: "every size and their sum must fit in i32",
                })
            };
            host.push(fit(s)?);
            offsets.push(fit(offset)?);
            spans.push((offset, s));
            offset += s;
        }
        let g = sizes.len();
        Ok(RowGroups {
            sizes: Tensor::constant_i32(host, [g], device)?,
            offsets: Tensor::constant_i32(offsets, [g], device)?,
            stride: None,
            host: Some(spans.into()),
            zero_pad_rows: false,
        })
    }

    /// `[G]` i32 rows per group.
    pub fn sizes(&self) -> &Tensor {
        &self.sizes
    }

    /// `[G]` i32 first row of each group.
    pub fn offsets(&self) -> &Tensor {
        &self.offsets
    }

    /// `Some(stride)` when group `g` starts at row `g·stride` ([`RowGroups::strided`]).
    pub fn stride(&self) -> Option<usize> {
        self.stride
    }

    /// `(offset, size)` per group when the sizes were given on the host
    /// ([`RowGroups::from_sizes`]), so a device backend can use them without a read.
    pub fn host_spans(&self) -> Option<&[(usize, usize)]> {
        self.host.as_deref()
    }

    /// Number of groups G.
    pub fn len(&self) -> usize {
        self.sizes.numel()
    }

    /// True if there are no groups.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// CPU backend: the groups as `(offset, size)` spans after checking that they are
    /// non-negative, in order, disjoint and inside `rows` (the operand's row count).
    pub(crate) fn cpu_spans(&self, op: &'static str, rows: usize) -> Result<Vec<(usize, usize)>> {
        let sizes = self.sizes.cpu_i32(op, "groups.sizes")?;
        let offsets = self.offsets.cpu_i32(op, "groups.offsets")?;
        check_spans(op, offsets, sizes, rows)
    }
}

/// Every backend's group check, on host copies of a [`RowGroups`]' offsets and sizes: the
/// groups as `(offset, size)` spans, or a named error unless they are non-negative, in
/// order, disjoint and inside `rows` (the operand's row count).
pub(crate) fn check_spans(
    op: &'static str,
    offsets: &[i32],
    sizes: &[i32],
    rows: usize,
) -> Result<Vec<(usize, usize)>> {
    let mut spans = Vec::with_capacity(sizes.len());
    let mut end = 0usize;
    for (g, (&o, &s)) in offsets.iter().zip(sizes).enumerate() {
        if o < 0 || s < 0 || (o as usize) < end || o as usize + s as usize > rows {
            return Err(Error::InvalidArgument {
                op,
                arg: "groups",
                value: format!("group {g}: offset {o}, size {s}, rows {rows}"),
                rule: "groups must be non-negative, in order, disjoint and inside the rows",
            });
        }
        end = o as usize + s as usize;
        spans.push((o as usize, s as usize));
    }
    Ok(spans)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_sizes_give_host_spans_and_device_sizes_do_not() {
        let g = RowGroups::from_sizes(&[2, 0, 3], Device::Cpu).unwrap();
        assert_eq!(g.host_spans(), Some(&[(0, 2), (2, 0), (2, 3)][..]));
        assert_eq!(g.offsets().to_host_i32().unwrap(), vec![0, 2, 2]);
        let sizes = Tensor::from_vec_i32(vec![1, 4], [2], Device::Cpu).unwrap();
        // On the CPU the backend reads the sizes in place: packed_read keeps no host copy.
        let p = RowGroups::packed_read(&sizes).unwrap();
        assert_eq!(p.host_spans(), None);
        let k = RowGroups::packed_known(&sizes, &[1, 4]).unwrap();
        assert_eq!(k.host_spans(), None);
        assert_eq!(k.offsets().to_host_i32().unwrap(), vec![0, 1]);
        assert_eq!(p.stride(), None);
        let s = RowGroups::strided(&sizes, 4).unwrap();
        assert_eq!((s.stride(), s.host_spans()), (Some(4), None));
        assert_eq!(s.offsets().to_host_i32().unwrap(), vec![0, 4]);
    }

    #[test]
    fn host_sizes_whose_offsets_leave_i32_are_a_named_error() {
        let big = i32::MAX as usize;
        assert!(RowGroups::from_sizes(&[big, 0], Device::Cpu).is_ok());
        let err = RowGroups::from_sizes(&[big, 1, 1], Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("must fit in i32"), "{err}");
    }

    #[test]
    fn known_host_sizes_of_the_wrong_length_are_a_named_error() {
        let sizes = Tensor::from_vec_i32(vec![1, 4], [2], Device::Cpu).unwrap();
        let err = RowGroups::packed_known(&sizes, &[1, 4, 0]).unwrap_err();
        assert!(err.to_string().contains("3 sizes for 2 groups"), "{err}");
    }
}
