//! The MoE routing and capacity families on the device (megamoe-cuda's `RouteKernels`): no
//! host read, except `sort_by_expert`, whose output length (the kept assignments) is
//! data-dependent and read once (the dropless path's one counts read).
//!
//! Ids are checked on the device in every build: a bad id writes the engine's error record
//! and the op's output is defined (zeros / −1) but meaningless; the next synchronising read
//! (`to_host`, normally the step's one stats read) returns the error naming the op
//! ([`CudaBackend::check_device_errors`]).

use super::{dev, CudaBackend};
use crate::ops::capacity::{CapacityKernels, CapacityPermutation};
use crate::ops::routing::{ExpertPermutation, KeepOrder, RoutingKernels};
use crate::{DType, Error, Result, Shape, Tensor};

/// `t`'s address after checking it holds i32 ids.
pub(super) fn ids(op: &'static str, arg: &'static str, t: &Tensor) -> Result<u64> {
    if t.dtype() != DType::I32 {
        return Err(Error::DTypeMismatch {
            op,
            arg,
            expected: "i32",
            got: t.dtype(),
        });
    }
    Ok(dev(op, t)?.ptr)
}

impl CudaBackend {
    /// `t` as f32 (a converted copy when it is not).
    fn f32_of(&self, t: &Tensor) -> Result<Tensor> {
        self.as_f32(t)
    }

    /// A fresh tensor of `shape`/`dtype` and its address.
    fn fresh(
        &self,
        op: &'static str,
        shape: impl Into<Shape>,
        dtype: DType,
    ) -> Result<(Tensor, u64)> {
        let e = self.engine(op)?;
        let (t, d) = self.empty(&e, shape.into(), dtype)?;
        Ok((t, d.ptr))
    }

    /// Positions of the assignments per expert (see `RouteKernels::positions`): (`pos [n]`,
    /// `counts [n_real]`) i32.
    fn positions(
        &self,
        op: &'static str,
        idx: &Tensor,
        keep: Option<&Tensor>,
        n_real: usize,
    ) -> Result<(Tensor, Tensor)> {
        let ip = ids(op, "idx", idx)?;
        let keep = keep.map(|k| self.f32_of(k)).transpose()?;
        let kp = keep
            .as_ref()
            .map(|k| dev(op, k))
            .transpose()?
            .map(|d| d.ptr);
        let n = idx.numel();
        let (pos, pp) = self.fresh(op, [n], DType::I32)?;
        let (counts, cp) = self.fresh(op, [n_real], DType::I32)?;
        let e = self.engine(op)?;
        // SAFETY: idx / keep hold n elements, pos n, counts n_real (all fresh or checked).
        self.ck(op, unsafe {
            e.rk.positions(&e.gpu, (ip, kp), (n, n_real), pp, cp, e.err.ptr())
        })?;
        Ok((pos, counts))
    }
}

impl RoutingKernels for CudaBackend {
    fn group_limited_mask(
        &self,
        sel: &Tensor,
        n_groups: usize,
        topk_groups: usize,
    ) -> Result<Tensor> {
        const OP: &str = "group_limited_mask";
        let (rows, e) = sel.dims2()?;
        let s = self.f32_of(sel)?;
        let sp = dev(OP, &s)?.ptr;
        let (out, op) = self.fresh(OP, [rows, e], DType::F32)?;
        let en = self.engine(OP)?;
        // SAFETY: sel and out hold rows·e f32.
        self.ck(OP, unsafe {
            en.rk
                .group_limited_mask(&en.gpu, sp, (rows, e, n_groups, topk_groups), op)
        })?;
        Ok(out)
    }

    fn expand_null_slots(&self, z: &Tensor, z_null: &Tensor, n_null: usize) -> Result<Tensor> {
        const OP: &str = "expand_null_slots";
        let (rows, e) = z.dims2()?;
        let (a, b) = (self.f32_of(z)?, self.f32_of(z_null)?);
        let (ap, bp) = (dev(OP, &a)?.ptr, dev(OP, &b)?.ptr);
        let (out, op) = self.fresh(OP, [rows, e + n_null], DType::F32)?;
        let en = self.engine(OP)?;
        // SAFETY: z [rows, e], z_null [rows], out [rows, e + n_null].
        self.ck(OP, unsafe {
            en.rk
                .expand_null_slots(&en.gpu, ap, bp, (rows, e, n_null), op)
        })?;
        Ok(out)
    }

    fn reduce_null_slots(&self, d_pool: &Tensor, n_real: usize) -> Result<(Tensor, Tensor)> {
        const OP: &str = "reduce_null_slots";
        let (rows, w) = d_pool.dims2()?;
        let d = self.f32_of(d_pool)?;
        let dp = dev(OP, &d)?.ptr;
        let (dz, zp) = self.fresh(OP, [rows, n_real], DType::F32)?;
        let (dn, np) = self.fresh(OP, [rows, 1], DType::F32)?;
        let en = self.engine(OP)?;
        // SAFETY: d_pool [rows, w], dz [rows, n_real], dn [rows].
        self.ck(OP, unsafe {
            en.rk
                .reduce_null_slots(&en.gpu, dp, (rows, n_real, w), zp, np)
        })?;
        Ok((dz, dn))
    }

    fn real_slot_mask(&self, idx: &Tensor, n_real: usize) -> Result<Tensor> {
        const OP: &str = "real_slot_mask";
        let ip = ids(OP, "idx", idx)?;
        let n = idx.numel();
        let (out, op) = self.fresh(OP, idx.shape().clone(), DType::F32)?;
        let en = self.engine(OP)?;
        // SAFETY: idx and out hold n elements.
        self.ck(OP, unsafe {
            en.rk.real_slot_mask(&en.gpu, ip, n, n_real, op)
        })?;
        Ok(out)
    }

    fn normalize_rows(&self, g: &Tensor, eps: f32) -> Result<Tensor> {
        const OP: &str = "normalize_rows";
        let (rows, k) = g.dims2()?;
        let x = self.f32_of(g)?;
        let xp = dev(OP, &x)?.ptr;
        let (out, op) = self.fresh(OP, [rows, k], DType::F32)?;
        let en = self.engine(OP)?;
        // SAFETY: g and out hold rows·k f32.
        self.ck(OP, unsafe {
            en.rk.normalize_rows(&en.gpu, xp, None, (rows, k), eps, op)
        })?;
        Ok(out)
    }

    fn normalize_rows_backward(&self, g: &Tensor, d_n: &Tensor, eps: f32) -> Result<Tensor> {
        const OP: &str = "normalize_rows_backward";
        let (rows, k) = g.dims2()?;
        let (x, d) = (self.f32_of(g)?, self.f32_of(d_n)?);
        let (xp, dp) = (dev(OP, &x)?.ptr, dev(OP, &d)?.ptr);
        let (out, op) = self.fresh(OP, [rows, k], DType::F32)?;
        let en = self.engine(OP)?;
        // SAFETY: g, d_n and out hold rows·k f32.
        self.ck(OP, unsafe {
            en.rk
                .normalize_rows(&en.gpu, xp, Some(dp), (rows, k), eps, op)
        })?;
        Ok(out)
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
        let n = idx.numel();
        let (pos, counts) = self.positions(OP, idx, None, n_real)?;
        let g = self.f32_of(gates)?;
        let gp = (order == KeepOrder::HighestGate)
            .then(|| dev(OP, &g))
            .transpose()?
            .map(|d| d.ptr);
        let ip = ids(OP, "idx", idx)?;
        let (pp, cp) = (dev(OP, &pos)?.ptr, dev(OP, &counts)?.ptr);
        let (keep, kp) = self.fresh(OP, idx.shape().clone(), DType::F32)?;
        let en = self.engine(OP)?;
        // SAFETY: idx, pos, gates, keep hold n elements, counts n_real.
        self.ck(OP, unsafe {
            en.rk
                .capacity_keep(&en.gpu, ip, pp, cp, (n, n_real), capacity, gp, kp)
        })?;
        Ok(keep)
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
        let ip = ids(OP, "idx", idx)?;
        let keep = keep.map(|w| self.f32_of(w)).transpose()?;
        let kp = keep
            .as_ref()
            .map(|w| dev(OP, w))
            .transpose()?
            .map(|d| d.ptr);
        let segs = t / seg_tokens;
        let (cnt, cp) = self.fresh(OP, [segs, n_slots], DType::I32)?;
        {
            let en = self.engine(OP)?;
            // SAFETY: idx (and keep) hold t·k elements, cnt segs·n_slots.
            self.ck(OP, unsafe {
                en.rk.slot_counts(
                    &en.gpu,
                    ip,
                    kp,
                    (t * k, k, seg_tokens, n_slots),
                    cp,
                    en.err.ptr(),
                )
            })?;
        }
        crate::backend::HostTransfer::to_dtype(self, &cnt, DType::F32)
    }

    fn sort_by_expert(
        &self,
        idx: &Tensor,
        keep: &Tensor,
        n_real: usize,
    ) -> Result<ExpertPermutation> {
        const OP: &str = "sort_by_expert";
        let (_, k) = idx.dims2()?;
        let n = idx.numel();
        let (pos, counts) = self.positions(OP, idx, Some(keep), n_real)?;
        // SYNC: the packed layout's length is the kept count (one read per dropless layer).
        let r: usize = counts
            .to_host_i32()?
            .iter()
            .map(|&c| c.max(0) as usize)
            .sum();
        let ip = ids(OP, "idx", idx)?;
        let (pp, cp) = (dev(OP, &pos)?.ptr, dev(OP, &counts)?.ptr);
        let (token, tp) = self.fresh(OP, [r], DType::I32)?;
        let (assignment, ap) = self.fresh(OP, [r], DType::I32)?;
        let (off, op) = self.fresh(OP, [n_real], DType::I32)?;
        let en = self.engine(OP)?;
        // SAFETY: idx and pos hold n elements, counts/off n_real, token/assignment r = Σ counts.
        self.ck(OP, unsafe {
            en.rk
                .offsets(&en.gpu, cp, n_real, op)
                .and_then(|()| en.rk.sort_place(&en.gpu, (ip, pp, op), (n, k), tp, ap))
        })?;
        drop(en);
        drop(off);
        Ok(ExpertPermutation {
            token,
            assignment,
            counts,
        })
    }

    fn pad_groups(&self, x: &Tensor, counts: &Tensor, capacity: usize) -> Result<Tensor> {
        const OP: &str = "pad_groups";
        let (r, d) = x.dims2()?;
        let cp = ids(OP, "counts", counts)?;
        let g = counts.numel();
        let xd = dev(OP, x)?;
        let (out, op) = self.fresh(OP, [g * capacity, d], DType::F32)?;
        let en = self.engine(OP)?;
        // SAFETY: x [r, d] (rows past r never read), counts g, out [g·capacity, d].
        self.ck(OP, unsafe {
            en.rk.pad_groups(
                &en.gpu,
                xd,
                (r, d),
                cp,
                (g, capacity),
                None,
                op,
                en.err.ptr(),
            )
        })?;
        Ok(out)
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
        let cp = ids(OP, "counts", counts)?;
        let g = counts.numel();
        if r != g * capacity {
            return Err(Error::ShapeMismatch {
                op: OP,
                lhs: x.dims().to_vec(),
                rhs: counts.dims().to_vec(),
                rule: "x must be [G·capacity, d], counts in 0..=capacity summing to rows",
            });
        }
        let xd = dev(OP, x)?;
        let (out, op) = self.fresh(OP, [rows, d], DType::F32)?;
        let en = self.engine(OP)?;
        // SAFETY: x [g·capacity, d], counts g, out [rows, d].
        self.ck(OP, unsafe {
            en.rk.pad_groups(
                &en.gpu,
                xd,
                (r, d),
                cp,
                (g, capacity),
                Some(rows),
                op,
                en.err.ptr(),
            )
        })?;
        Ok(out)
    }

    fn expert_bias_step(&self, counts: &Tensor, rate: f32, centre: bool) -> Result<Tensor> {
        const OP: &str = "expert_bias_step";
        let c = self.f32_of(counts)?;
        let cp = dev(OP, &c)?.ptr;
        let n = counts.numel();
        let (out, op) = self.fresh(OP, counts.shape().clone(), DType::F32)?;
        let en = self.engine(OP)?;
        // SAFETY: counts and out hold n f32.
        self.ck(OP, unsafe {
            en.rk.expert_bias_step(&en.gpu, cp, n, rate, centre, op)
        })?;
        Ok(out)
    }
}

impl CapacityKernels for CudaBackend {
    fn capacity_permutation(
        &self,
        idx: &Tensor,
        keep: &Tensor,
        n_real: usize,
        capacity: usize,
    ) -> Result<CapacityPermutation> {
        const OP: &str = "capacity_permutation";
        let (t, k) = idx.dims2()?;
        let (pos, counts) = self.positions(OP, idx, Some(keep), n_real)?;
        let ip = ids(OP, "idx", idx)?;
        let (pp, cp) = (dev(OP, &pos)?.ptr, dev(OP, &counts)?.ptr);
        let (slot_row, sp) = self.fresh(OP, [t, k], DType::I32)?;
        let (row_token, rp) = self.fresh(OP, [n_real * capacity], DType::I32)?;
        let en = self.engine(OP)?;
        // SAFETY: idx/pos/slot_row hold t·k, row_token n_real·capacity, counts n_real.
        self.ck(OP, unsafe {
            en.rk.capacity_place(
                &en.gpu,
                ip,
                pp,
                (t * k, k, n_real, capacity),
                sp,
                rp,
                cp,
                en.err.ptr(),
            )
        })?;
        Ok(CapacityPermutation {
            slot_row,
            row_token,
            counts,
        })
    }

    fn gather_rows_or_zero(&self, x: &Tensor, rows: &Tensor) -> Result<Tensor> {
        const OP: &str = "gather_rows_or_zero";
        let (n, d) = x.dims2()?;
        let rp = ids(OP, "rows", rows)?;
        let r = rows.numel();
        let xd = dev(OP, x)?;
        let (out, op) = self.fresh(OP, [r, d], DType::F32)?;
        let en = self.engine(OP)?;
        // SAFETY: x [n, d] (ids checked on the device), rows r, out [r, d].
        self.ck(OP, unsafe {
            en.rk
                .gather_rows_or_zero(&en.gpu, xd, (n, d), rp, r, op, en.err.ptr())
        })?;
        Ok(out)
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
        let sp = ids(OP, "slot_row", slot_row)?;
        let rd = dev(OP, rows)?;
        let wd = weights.map(|w| dev(OP, w)).transpose()?;
        let (y, yp) = self.fresh(OP, [t, d], DType::F32)?;
        let en = self.engine(OP)?;
        // SAFETY: rows [b, d], slot_row/weights [t, k], y [t, d].
        self.ck(OP, unsafe {
            en.rk
                .combine_slots(&en.gpu, rd, (b, d), sp, wd, (t, k), yp, en.err.ptr())
        })?;
        Ok(y)
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
        let sp = ids(OP, "slot_row", slot_row)?;
        let (rd, yd, wd) = (dev(OP, rows)?, dev(OP, d_y)?, dev(OP, weights)?);
        let (d_rows, drp) = self.fresh(OP, [b, d], DType::F32)?;
        let (d_w, dwp) = self.fresh(OP, [t, k], DType::F32)?;
        let en = self.engine(OP)?;
        // SAFETY: rows/d_rows [b, d], d_y [t, d], slot_row/weights/d_w [t, k].
        self.ck(OP, unsafe {
            en.rk.combine_slots_bwd(
                &en.gpu,
                rd,
                (b, d),
                yd,
                sp,
                wd,
                (t, k),
                (drp, dwp),
                en.err.ptr(),
            )
        })?;
        Ok((d_rows, d_w))
    }
}

impl CudaBackend {
    /// Reads the engine's device error record (after a synchronisation) and, if an index
    /// check failed since the last read, clears it and returns the error naming the check.
    /// Called by every synchronising read ([`HostTransfer::to_host`](crate::backend::HostTransfer)).
    pub(crate) fn check_device_errors(&self, e: &super::Engine) -> Result<()> {
        let mut rec = [0i32; 4];
        self.ck("check_device_errors", e.gpu.download(&e.err, &mut rec))?;
        let Some(bad) = megamoe_cuda::tensor::RouteError::decode(rec) else {
            return Ok(());
        };
        self.ck("check_device_errors", e.gpu.memset(&e.err, 0))?;
        let (op, rule) = bad.rule();
        Err(Error::InvalidArgument {
            op,
            arg: "ids (checked on the device)",
            value: format!(
                "{} at position {} (bound {})",
                bad.index, bad.position, bad.bound
            ),
            rule,
        })
    }
}
