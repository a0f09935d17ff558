//! [`RoutingKernels`] on the CPU. Slot ids and group counts are checked on the host.

use crate::backend::CpuBackend;
use crate::cpu::backend::index::check_indices;
use crate::cpu::routing as kernel;
use crate::ops::routing::{ExpertPermutation, KeepOrder, RoutingKernels};
use crate::{Error, Result, Tensor};

fn counts_error(op: &'static str, x: &Tensor, counts: &Tensor, rule: &'static str) -> Error {
    Error::ShapeMismatch {
        op,
        lhs: x.dims().to_vec(),
        rhs: counts.dims().to_vec(),
        rule,
    }
}

impl RoutingKernels for CpuBackend {
    fn kept_slots(&self, idx: &Tensor, keep: &Tensor) -> Result<Tensor> {
        const OP: &str = "kept_slots";
        let ids = idx.cpu_i32(OP, "idx")?;
        let k = keep.cpu_f32(OP, "keep")?;
        let out = ids
            .iter()
            .zip(k.iter())
            .map(|(&s, &kv)| if kv != 0.0 { s } else { -1 })
            .collect();
        Ok(Tensor::cpu_i32_from(out, idx.shape()))
    }

    fn group_limited_mask(
        &self,
        sel: &Tensor,
        n_groups: usize,
        topk_groups: usize,
    ) -> Result<Tensor> {
        let (_, e) = sel.dims2()?;
        let s = sel.cpu_f32("group_limited_mask", "sel")?;
        Ok(Tensor::cpu_f32_from(
            kernel::group_limited_mask(&s, e, n_groups, topk_groups),
            sel.shape(),
        ))
    }

    fn expand_null_slots(&self, z: &Tensor, z_null: &Tensor, n_null: usize) -> Result<Tensor> {
        const OP: &str = "expand_null_slots";
        let (t, e) = z.dims2()?;
        let zv = z.cpu_f32(OP, "z")?;
        let zn = z_null.cpu_f32(OP, "z_null")?;
        Ok(Tensor::cpu_f32_from(
            kernel::expand_null_slots(&zv, e, &zn, n_null),
            [t, e + n_null],
        ))
    }

    fn reduce_null_slots(&self, d_pool: &Tensor, n_real: usize) -> Result<(Tensor, Tensor)> {
        let (t, w) = d_pool.dims2()?;
        let d = d_pool.cpu_f32("reduce_null_slots", "d_pool")?;
        let (dz, dn) = kernel::reduce_null_slots(&d, n_real, w);
        Ok((
            Tensor::cpu_f32_from(dz, [t, n_real]),
            Tensor::cpu_f32_from(dn, [t, 1]),
        ))
    }

    fn real_slot_mask(&self, idx: &Tensor, n_real: usize) -> Result<Tensor> {
        let ids = idx.cpu_i32("real_slot_mask", "idx")?;
        Ok(Tensor::cpu_f32_from(
            kernel::real_slot_mask(ids, n_real),
            idx.shape(),
        ))
    }

    fn normalize_rows(&self, g: &Tensor, eps: f32) -> Result<Tensor> {
        let (_, k) = g.dims2()?;
        let gv = g.cpu_f32("normalize_rows", "g")?;
        Ok(Tensor::cpu_f32_from(
            kernel::normalize_rows(&gv, k, eps),
            g.shape(),
        ))
    }

    fn normalize_rows_backward(&self, g: &Tensor, d_n: &Tensor, eps: f32) -> Result<Tensor> {
        const OP: &str = "normalize_rows_backward";
        let (_, k) = g.dims2()?;
        let gv = g.cpu_f32(OP, "g")?;
        let dn = d_n.cpu_f32(OP, "d_n")?;
        Ok(Tensor::cpu_f32_from(
            kernel::normalize_rows_backward(&gv, &dn, k, eps),
            g.shape(),
        ))
    }

    fn capacity_keep(
        &self,
        idx: &Tensor,
        gates: &Tensor,
        n_real: usize,
        capacity: Option<usize>,
        order: KeepOrder,
    ) -> Result<Tensor> {
        const OP: &str = "capacity_keep";
        let ids = idx.cpu_i32(OP, "idx")?;
        check_indices(OP, ids, i32::MAX as usize)?;
        let g = gates.cpu_f32(OP, "gates")?;
        Ok(Tensor::cpu_f32_from(
            kernel::capacity_keep(ids, &g, n_real, capacity, order == KeepOrder::HighestGate),
            idx.shape(),
        ))
    }

    fn slot_counts(
        &self,
        idx: &Tensor,
        keep: Option<&Tensor>,
        n_slots: usize,
        seg_tokens: usize,
    ) -> Result<Tensor> {
        const OP: &str = "slot_counts";
        let (t, k) = idx.dims2()?;
        let ids = idx.cpu_i32(OP, "idx")?;
        check_indices(OP, ids, n_slots)?;
        let kd = keep.map(|w| w.cpu_f32(OP, "keep")).transpose()?;
        Ok(Tensor::cpu_f32_from(
            kernel::slot_counts(ids, k, kd.as_deref(), n_slots, seg_tokens),
            [t / seg_tokens, n_slots],
        ))
    }

    fn sort_by_expert(
        &self,
        idx: &Tensor,
        keep: &Tensor,
        n_real: usize,
    ) -> Result<ExpertPermutation> {
        const OP: &str = "sort_by_expert";
        let (_, k) = idx.dims2()?;
        let ids = idx.cpu_i32(OP, "idx")?;
        check_indices(OP, ids, i32::MAX as usize)?;
        let kd = keep.cpu_f32(OP, "keep")?;
        let (token, assignment, counts) = kernel::sort_by_expert(ids, k, &kd, n_real);
        let r = token.len();
        let mut slot_row = vec![-1i32; ids.len()];
        for (row, &a) in assignment.iter().enumerate() {
            slot_row[a as usize] = row as i32;
        }
        Ok(ExpertPermutation {
            token: Tensor::cpu_i32_from(token, [r]),
            assignment: Tensor::cpu_i32_from(assignment, [r]),
            slot_row: Tensor::cpu_i32_from(slot_row, idx.dims().to_vec()),
            counts: Tensor::cpu_i32_from(counts, [n_real]),
            host_counts: None,
        })
    }

    fn pad_groups(&self, x: &Tensor, counts: &Tensor, capacity: usize) -> Result<Tensor> {
        const OP: &str = "pad_groups";
        let (r, d) = x.dims2()?;
        let c = counts.cpu_i32(OP, "counts")?;
        let total: usize = c.iter().map(|&v| v.max(0) as usize).sum();
        if total != r || c.iter().any(|&v| v < 0 || v as usize > capacity) {
            return Err(counts_error(
                OP,
                x,
                counts,
                "counts must be in 0..=capacity and sum to the rows of x",
            ));
        }
        let xv = x.cpu_f32(OP, "x")?;
        Ok(Tensor::cpu_f32_from(
            kernel::pad_groups(&xv, d, c, capacity),
            [c.len() * capacity, d],
        ))
    }

    fn unpad_groups(
        &self,
        x: &Tensor,
        counts: &Tensor,
        capacity: usize,
        rows: usize,
    ) -> Result<Tensor> {
        const OP: &str = "unpad_groups";
        let (r, d) = x.dims2()?;
        let c = counts.cpu_i32(OP, "counts")?;
        let total: usize = c.iter().map(|&v| v.max(0) as usize).sum();
        if r != c.len() * capacity
            || total != rows
            || c.iter().any(|&v| v < 0 || v as usize > capacity)
        {
            return Err(counts_error(
                OP,
                x,
                counts,
                "x must be [G·capacity, d], counts in 0..=capacity summing to rows",
            ));
        }
        let xv = x.cpu_f32(OP, "x")?;
        Ok(Tensor::cpu_f32_from(
            kernel::unpad_groups(&xv, d, c, capacity),
            [rows, d],
        ))
    }

    fn expert_bias_step(&self, counts: &Tensor, rate: f32, centre: bool) -> Result<Tensor> {
        let c = counts.cpu_f32("expert_bias_step", "counts")?;
        Ok(Tensor::cpu_f32_from(
            kernel::expert_bias_step(&c, rate, centre),
            counts.shape(),
        ))
    }
}
