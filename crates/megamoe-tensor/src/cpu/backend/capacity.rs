//! [`CapacityKernels`] on the CPU. Row ids are checked on the host.

use crate::backend::CpuBackend;
use crate::cpu::capacity as kernel;
use crate::ops::capacity::{CapacityKernels, CapacityPermutation};
use crate::{Error, Result, Tensor};

/// Checks every id is `-1` (empty) or in `0..bound`.
fn check_rows(op: &'static str, ids: &[i32], bound: usize) -> Result<()> {
    if let Some((position, &index)) = ids
        .iter()
        .enumerate()
        .find(|(_, &i)| i < -1 || (i >= 0 && i as usize >= bound))
    {
        return Err(Error::IndexOutOfRange {
            op,
            index: index as i64,
            position,
            bound,
        });
    }
    Ok(())
}

impl CapacityKernels for CpuBackend {
    fn capacity_permutation(
        &self,
        idx: &Tensor,
        keep: &Tensor,
        n_real: usize,
        capacity: usize,
    ) -> Result<CapacityPermutation> {
        const OP: &str = "capacity_permutation";
        let (t, k) = idx.dims2()?;
        let ids = idx.cpu_i32(OP, "idx")?;
        if let Some((position, &index)) = ids.iter().enumerate().find(|(_, &i)| i < 0) {
            return Err(Error::IndexOutOfRange {
                op: OP,
                index: index as i64,
                position,
                bound: i32::MAX as usize,
            });
        }
        let kd = keep.cpu_f32(OP, "keep")?;
        let (slot_row, row_token, counts) =
            kernel::capacity_permutation(ids, k, &kd, n_real, capacity).map_err(|e| {
                Error::InvalidArgument {
                    op: OP,
                    arg: "keep",
                    value: format!("expert {e} keeps more than capacity {capacity}"),
                    rule: "keep at most `capacity` assignments per expert (capacity_keep)",
                }
            })?;
        Ok(CapacityPermutation {
            slot_row: Tensor::cpu_i32_from(slot_row, [t, k]),
            row_token: Tensor::cpu_i32_from(row_token, [n_real * capacity]),
            counts: Tensor::cpu_i32_from(counts, [n_real]),
        })
    }

    fn gather_rows_or_zero(&self, x: &Tensor, rows: &Tensor) -> Result<Tensor> {
        const OP: &str = "gather_rows_or_zero";
        let (n, d) = x.dims2()?;
        let ids = rows.cpu_i32(OP, "rows")?;
        check_rows(OP, ids, n)?;
        let xv = x.cpu_f32(OP, "x")?;
        Ok(Tensor::cpu_f32_from(
            kernel::gather_rows_or_zero(&xv, d, ids),
            [ids.len(), d],
        ))
    }

    fn combine_slots(
        &self,
        rows: &Tensor,
        slot_row: &Tensor,
        weights: Option<&Tensor>,
    ) -> Result<Tensor> {
        const OP: &str = "combine_slots";
        let (b, d) = rows.dims2()?;
        let (t, k) = slot_row.dims2()?;
        let ids = slot_row.cpu_i32(OP, "slot_row")?;
        check_rows(OP, ids, b)?;
        let w = weights.map(|w| w.cpu_f32(OP, "weights")).transpose()?;
        let r = rows.cpu_f32(OP, "rows")?;
        Ok(Tensor::cpu_f32_from(
            kernel::combine_slots(&r, d, ids, k, w.as_deref()),
            [t, d],
        ))
    }

    fn combine_slots_backward(
        &self,
        rows: &Tensor,
        d_y: &Tensor,
        slot_row: &Tensor,
        weights: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        const OP: &str = "combine_slots_backward";
        let (b, d) = rows.dims2()?;
        let (t, k) = slot_row.dims2()?;
        let ids = slot_row.cpu_i32(OP, "slot_row")?;
        check_rows(OP, ids, b)?;
        let (r, dy, w) = (
            rows.cpu_f32(OP, "rows")?,
            d_y.cpu_f32(OP, "d_y")?,
            weights.cpu_f32(OP, "weights")?,
        );
        let (d_rows, d_w) = kernel::combine_slots_backward(&r, d, &dy, ids, k, &w);
        Ok((
            Tensor::cpu_f32_from(d_rows, [b, d]),
            Tensor::cpu_f32_from(d_w, [t, k]),
        ))
    }
}
