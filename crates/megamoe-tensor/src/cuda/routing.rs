//! The MoE routing and capacity families on the device (megamoe-cuda's `RouteKernels`): no
//! host read, except `sort_by_expert`, whose output length (the kept assignments) is
//! data-dependent and read once (the dropless path's one counts read).
//!
//! Ids are checked on the device in every build: a bad id writes the engine's error record
//! and the op's output is defined (zeros / −1) but meaningless; the next synchronising read
//! (`to_host`, normally the step's one stats read) returns the error naming the op
//! ([`CudaBackend::check_device_errors`]).

use megamoe_cuda::tensor::{RouteKernels, RouteLossArgs, RouteOut, RouteScoreFn, RouteShape};
use megamoe_cuda::Gpu;

use super::{dev, CudaBackend};
use crate::ops::capacity::{CapacityKernels, CapacityPermutation};
use crate::ops::router::{
    route_backward_composed, route_composed, RouteLossGrads, RouteSaved, RouteScore, RouteSpec,
    Routed,
};
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
    /// `t` as f32 (a converted copy when it is not) and that copy's address: the copy must
    /// outlive the launch that reads it.
    fn f32_arg(&self, op: &'static str, t: &Tensor) -> Result<(Tensor, u64)> {
        let f = self.as_f32(t)?;
        let p = dev(op, &f)?.ptr;
        Ok((f, p))
    }

    /// [`CudaBackend::f32_arg`] of an optional tensor (address 0 / `None` when absent).
    fn opt_f32_arg(
        &self,
        op: &'static str,
        t: Option<&Tensor>,
    ) -> Result<(Option<Tensor>, Option<u64>)> {
        match t {
            Some(t) => {
                let (f, p) = self.f32_arg(op, t)?;
                Ok((Some(f), Some(p)))
            }
            None => Ok((None, None)),
        }
    }

    /// A fresh tensor of `shape`/`dtype` and its address.
    fn fresh(
        &self,
        op: &'static str,
        shape: impl Into<Shape>,
        dtype: DType,
    ) -> Result<(Tensor, u64)> {
        let (t, d) = self.fresh_dev(op, shape, dtype)?;
        Ok((t, d.ptr))
    }

    /// A fresh tensor of `shape`/`dtype` and its kernel view (address and element type).
    fn fresh_dev(
        &self,
        op: &'static str,
        shape: impl Into<Shape>,
        dtype: DType,
    ) -> Result<(Tensor, megamoe_cuda::tensor::Dev)> {
        let e = self.engine(op)?;
        self.empty(&e, shape.into(), dtype)
    }

    /// Runs `launch(kernels, gpu, err)` (the routing kernels, the GPU, the engine's device
    /// error record) under `op`'s engine lock and names its error.
    fn route(
        &self,
        op: &'static str,
        launch: impl FnOnce(&RouteKernels, &Gpu, u64) -> megamoe_cuda::Result<()>,
    ) -> Result<()> {
        let en = self.engine(op)?;
        self.ck(op, launch(&en.rk, &en.gpu, en.err.ptr()))
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
        let (_keep, kp) = self.opt_f32_arg(op, keep)?;
        let n = idx.numel();
        let (pos, pp) = self.fresh(op, [n], DType::I32)?;
        let (counts, cp) = self.fresh(op, [n_real], DType::I32)?;
        // SAFETY: idx / keep hold n elements, pos n, counts n_real (all fresh or checked).
        self.route(op, |rk, gpu, err| unsafe {
            rk.positions(gpu, (ip, kp), (n, n_real), pp, cp, err)
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
        let (_s, sp) = self.f32_arg(OP, sel)?;
        let (out, op) = self.fresh(OP, [rows, e], DType::F32)?;
        // SAFETY: sel and out hold rows·e f32.
        self.route(OP, |rk, gpu, _| unsafe {
            rk.group_limited_mask(gpu, sp, (rows, e, n_groups, topk_groups), op)
        })?;
        Ok(out)
    }

    fn expand_null_slots(&self, z: &Tensor, z_null: &Tensor, n_null: usize) -> Result<Tensor> {
        const OP: &str = "expand_null_slots";
        let (rows, e) = z.dims2()?;
        let ((_a, ap), (_b, bp)) = (self.f32_arg(OP, z)?, self.f32_arg(OP, z_null)?);
        let (out, op) = self.fresh(OP, [rows, e + n_null], DType::F32)?;
        // SAFETY: z [rows, e], z_null [rows], out [rows, e + n_null].
        self.route(OP, |rk, gpu, _| unsafe {
            rk.expand_null_slots(gpu, ap, bp, (rows, e, n_null), op)
        })?;
        Ok(out)
    }

    fn reduce_null_slots(&self, d_pool: &Tensor, n_real: usize) -> Result<(Tensor, Tensor)> {
        const OP: &str = "reduce_null_slots";
        let (rows, w) = d_pool.dims2()?;
        let (_d, dp) = self.f32_arg(OP, d_pool)?;
        let (dz, zp) = self.fresh(OP, [rows, n_real], DType::F32)?;
        let (dn, np) = self.fresh(OP, [rows, 1], DType::F32)?;
        // SAFETY: d_pool [rows, w], dz [rows, n_real], dn [rows].
        self.route(OP, |rk, gpu, _| unsafe {
            rk.reduce_null_slots(gpu, dp, (rows, n_real, w), zp, np)
        })?;
        Ok((dz, dn))
    }

    fn real_slot_mask(&self, idx: &Tensor, n_real: usize) -> Result<Tensor> {
        const OP: &str = "real_slot_mask";
        let ip = ids(OP, "idx", idx)?;
        let n = idx.numel();
        let (out, op) = self.fresh(OP, idx.shape().clone(), DType::F32)?;
        // SAFETY: idx and out hold n elements.
        self.route(OP, |rk, gpu, _| unsafe {
            rk.real_slot_mask(gpu, ip, n, n_real, op)
        })?;
        Ok(out)
    }

    fn normalize_rows(&self, g: &Tensor, eps: f32) -> Result<Tensor> {
        const OP: &str = "normalize_rows";
        let (rows, k) = g.dims2()?;
        let (_x, xp) = self.f32_arg(OP, g)?;
        let (out, op) = self.fresh(OP, [rows, k], DType::F32)?;
        // SAFETY: g and out hold rows·k f32.
        self.route(OP, |rk, gpu, _| unsafe {
            rk.normalize_rows(gpu, xp, None, (rows, k), eps, op)
        })?;
        Ok(out)
    }

    fn normalize_rows_backward(&self, g: &Tensor, d_n: &Tensor, eps: f32) -> Result<Tensor> {
        const OP: &str = "normalize_rows_backward";
        let (rows, k) = g.dims2()?;
        let ((_x, xp), (_d, dp)) = (self.f32_arg(OP, g)?, self.f32_arg(OP, d_n)?);
        let (out, op) = self.fresh(OP, [rows, k], DType::F32)?;
        // SAFETY: g, d_n and out hold rows·k f32.
        self.route(OP, |rk, gpu, _| unsafe {
            rk.normalize_rows(gpu, xp, Some(dp), (rows, k), eps, op)
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
        let by_gate = (order == KeepOrder::HighestGate).then_some(gates);
        let (_g, gp) = self.opt_f32_arg(OP, by_gate)?;
        let ip = ids(OP, "idx", idx)?;
        let (pp, cp) = (dev(OP, &pos)?.ptr, dev(OP, &counts)?.ptr);
        let (keep, kp) = self.fresh(OP, idx.shape().clone(), DType::F32)?;
        // SAFETY: idx, pos, gates, keep hold n elements, counts n_real.
        self.route(OP, |rk, gpu, _| unsafe {
            rk.capacity_keep(gpu, ip, pp, cp, (n, n_real), capacity, gp, kp)
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
        let (_keep, kp) = self.opt_f32_arg(OP, keep)?;
        let segs = t / seg_tokens;
        // f32 counts straight from the kernel (exact below 2^24 assignments), else i32 cast.
        let f32_out = t * k < 1 << 24;
        let dtype = if f32_out { DType::F32 } else { DType::I32 };
        let (cnt, cp) = self.fresh(OP, [segs, n_slots], dtype)?;
        // SAFETY: idx (and keep) hold t·k elements, cnt segs·n_slots.
        self.route(OP, |rk, gpu, err| unsafe {
            rk.slot_counts(
                gpu,
                ip,
                kp,
                (t * k, k, seg_tokens, n_slots),
                (cp, f32_out),
                err,
            )
        })?;
        if f32_out {
            return Ok(cnt);
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
        // SYNC: the packed layout's length is the kept count (one read per dropless layer;
        // kept as `host_counts` for the layer's grouped GEMMs).
        let host_counts: std::sync::Arc<[i32]> = counts.to_host_i32()?.into();
        let r: usize = host_counts.iter().map(|&c| c.max(0) as usize).sum();
        let ip = ids(OP, "idx", idx)?;
        let (pp, cp) = (dev(OP, &pos)?.ptr, dev(OP, &counts)?.ptr);
        let (token, tp) = self.fresh(OP, [r], DType::I32)?;
        let (assignment, ap) = self.fresh(OP, [r], DType::I32)?;
        let (slot_row, sp) = self.fresh(OP, idx.shape().clone(), DType::I32)?;
        let (_off, op) = self.fresh(OP, [n_real], DType::I32)?;
        // SAFETY: idx, pos and slot_row hold n elements, counts/off n_real, token/assignment
        // r = Σ counts.
        self.route(OP, |rk, gpu, _| unsafe {
            rk.offsets(gpu, cp, n_real, op)
                .and_then(|()| rk.sort_place(gpu, (ip, pp, op), (n, k), (tp, ap, sp)))
        })?;
        Ok(ExpertPermutation {
            token,
            assignment,
            slot_row,
            counts,
            host_counts: Some(host_counts),
        })
    }

    fn pad_groups(&self, x: &Tensor, counts: &Tensor, capacity: usize) -> Result<Tensor> {
        const OP: &str = "pad_groups";
        let (r, d) = x.dims2()?;
        let cp = ids(OP, "counts", counts)?;
        let g = counts.numel();
        let xd = dev(OP, x)?;
        let (out, op) = self.fresh(OP, [g * capacity, d], DType::F32)?;
        // SAFETY: x [r, d] (rows past r never read), counts g, out [g·capacity, d].
        self.route(OP, |rk, gpu, err| unsafe {
            rk.pad_groups(gpu, xd, (r, d), cp, (g, capacity), None, op, err)
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
        // SAFETY: x [g·capacity, d], counts g, out [rows, d].
        self.route(OP, |rk, gpu, err| unsafe {
            rk.pad_groups(gpu, xd, (r, d), cp, (g, capacity), Some(rows), op, err)
        })?;
        Ok(out)
    }

    fn kept_slots(&self, idx: &Tensor, keep: &Tensor) -> Result<Tensor> {
        const OP: &str = "kept_slots";
        let ip = ids(OP, "idx", idx)?;
        let (_k, kp) = self.f32_arg(OP, keep)?;
        let n = idx.numel();
        let (out, op) = self.fresh(OP, idx.shape().clone(), DType::I32)?;
        // SAFETY: idx, keep and out hold n elements.
        self.route(OP, |rk, gpu, _| unsafe {
            rk.kept_slots(gpu, ip, kp, n, op)
        })?;
        Ok(out)
    }

    fn expert_bias_step(&self, counts: &Tensor, rate: f32, centre: bool) -> Result<Tensor> {
        const OP: &str = "expert_bias_step";
        let (_c, cp) = self.f32_arg(OP, counts)?;
        let n = counts.numel();
        let (out, op) = self.fresh(OP, counts.shape().clone(), DType::F32)?;
        // SAFETY: counts and out hold n f32.
        self.route(OP, |rk, gpu, _| unsafe {
            rk.expert_bias_step(gpu, cp, n, rate, centre, op)
        })?;
        Ok(out)
    }
    fn route(&self, logits: &Tensor, bias: Option<&Tensor>, spec: &RouteSpec) -> Result<Routed> {
        const OP: &str = "route";
        let (rows, pool) = logits.dims2()?;
        let shape = route_shape(rows, pool, spec);
        // Named fallback: shapes past the fused kernel's limits (pool > 256 slots, k > 64)
        // and invalid groups run the definition, which also names any invalid argument.
        if shape.check().is_err() {
            return route_composed(logits, bias, spec);
        }
        let (_z, zp) = self.f32_arg(OP, logits)?;
        let (_b, bp) = self.opt_f32_arg(OP, bias)?;
        let k = spec.k;
        let (slots, sp) = self.fresh(OP, [rows, k], DType::I32)?;
        let (gates, gp) = self.fresh(OP, [rows, k], DType::F32)?;
        let (g_raw, rp) = self.fresh(OP, [rows, k], DType::F32)?;
        let g_masked = if spec.normalize {
            Some(self.fresh(OP, [rows, k], DType::F32)?)
        } else {
            None
        };
        let (probs, pp) = self.fresh(OP, [rows, pool], DType::F32)?;
        let (lse, lp) = self.fresh(OP, [rows], DType::F32)?;
        let out = RouteOut {
            slots: sp,
            gates: gp,
            g_raw: rp,
            g_masked: g_masked.as_ref().map(|(_, p)| *p),
            probs: pp,
            lse: lp,
        };
        // SAFETY: logits [rows, pool] f32, bias [n_real] f32 (checked by the op), every
        // output fresh with the size `RouteOut` names.
        self.route(OP, |rk, gpu, _| unsafe {
            rk.route_tokens(gpu, zp, bp, &shape, &out)
        })?;
        let real_mask = if pool > spec.n_real {
            Some(slots.real_slot_mask(spec.n_real)?)
        } else {
            None
        };
        Ok(Routed {
            slots,
            gates,
            g_raw,
            g_masked: g_masked.map(|(t, _)| t),
            real_mask,
            probs,
            lse,
        })
    }

    fn route_backward(
        &self,
        d_gates: &Tensor,
        saved: RouteSaved<'_>,
        spec: &RouteSpec,
        losses: RouteLossGrads<'_>,
    ) -> Result<Tensor> {
        const OP: &str = "route_backward";
        let (rows, pool) = saved.probs.dims2()?;
        let shape = route_shape(rows, pool, spec);
        // Named fallback, as in `route`.
        if shape.check().is_err() {
            return route_backward_composed(d_gates, saved, spec, losses);
        }
        let (_d, dp) = self.f32_arg(OP, d_gates)?;
        let sp = ids(OP, "slots", saved.slots)?;
        let (_r, rp) = self.f32_arg(OP, saved.g_raw)?;
        let (_m, mp) = self.opt_f32_arg(OP, saved.g_masked)?;
        let (_p, pp) = self.f32_arg(OP, saved.probs)?;
        let (_c, cp) = self.opt_f32_arg(OP, losses.aux.map(|(c, _)| c))?;
        let (_l, lp) = self.opt_f32_arg(OP, losses.z.map(|(l, _)| l))?;
        let loss_args = RouteLossArgs {
            aux_coeff: cp,
            aux_scale: losses.aux.map_or(0.0, |(_, s)| s),
            lse: lp,
            z_scale: losses.z.map_or(0.0, |(_, s)| s),
        };
        let (d_z, zp) = self.fresh(OP, [rows, pool], DType::F32)?;
        let inputs = RouteOut {
            slots: sp,
            gates: 0,
            g_raw: rp,
            g_masked: mp,
            probs: pp,
            lse: 0,
        };
        // SAFETY: d_gates / slots / g_raw / g_masked [rows, k], probs, coeff and d_z
        // [rows, pool], lse [rows] (shapes checked by the op), d_z fresh.
        self.route(OP, |rk, gpu, err| unsafe {
            rk.route_tokens_bwd(gpu, dp, &inputs, &shape, &loss_args, (zp, err))
        })?;
        Ok(d_z)
    }
}

/// The fused router kernels' shape of a [`RouteSpec`] over `[rows, pool]` logits.
fn route_shape(rows: usize, pool: usize, spec: &RouteSpec) -> RouteShape {
    RouteShape {
        rows,
        pool,
        n_real: spec.n_real,
        k: spec.k,
        score_fn: match spec.score {
            RouteScore::Softmax => RouteScoreFn::Softmax,
            RouteScore::Sigmoid => RouteScoreFn::Sigmoid,
            RouteScore::SoftmaxAfterTopk => RouteScoreFn::SoftmaxAfterTopk,
        },
        groups: spec.groups,
        eps: spec.eps,
        scale: spec.scale,
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
        // SAFETY: idx/pos/slot_row hold t·k, row_token n_real·capacity, counts n_real.
        self.route(OP, |rk, gpu, err| unsafe {
            rk.capacity_place(gpu, ip, pp, (t * k, k, n_real, capacity), sp, rp, cp, err)
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
        // An exact copy: bf16 rows stay bf16 in bf16-activation mode.
        let (out, od) = self.fresh_dev(OP, [r, d], self.elementwise_dtype(&[x]))?;
        // SAFETY: x [n, d] (ids checked on the device), rows r, out [r, d].
        self.route(OP, |rk, gpu, err| unsafe {
            rk.gather_rows_or_zero(gpu, xd, (n, d), rp, r, od, err)
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
        // The weighted combine is the layer's output (an activation: bf16 rows give bf16 in
        // bf16-activation mode, summed in f32 and rounded once); unweighted, it is the
        // permute's backward, which starts the layer's input-gradient sum: f32.
        let dtype = match weights {
            Some(_) => self.elementwise_dtype(&[rows]),
            None => DType::F32,
        };
        let (y, yd) = self.fresh_dev(OP, [t, d], dtype)?;
        // SAFETY: rows [b, d], slot_row/weights [t, k], y [t, d].
        self.route(OP, |rk, gpu, err| unsafe {
            rk.combine_slots(gpu, rd, (b, d), sp, wd, (t, k), yd, err)
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
        // d_rows is an activation gradient (the experts' output gradient): bf16 in
        // bf16-activation mode when rows or d_y is bf16; the gate gradients stay f32.
        let dtype = self.elementwise_dtype(&[rows, d_y]);
        let (d_rows, drd) = self.fresh_dev(OP, [b, d], dtype)?;
        let (d_w, dwp) = self.fresh(OP, [t, k], DType::F32)?;
        // SAFETY: rows/d_rows [b, d], d_y [t, d], slot_row/weights/d_w [t, k].
        self.route(OP, |rk, gpu, err| unsafe {
            rk.combine_slots_bwd(gpu, rd, (b, d), yd, sp, wd, (t, k), (drd, dwp), err)
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
        if let Some(op) = bad.index_op() {
            return Err(Error::IndexOutOfRange {
                op,
                index: i64::from(bad.index),
                position: bad.position.max(0) as usize,
                bound: bad.bound.max(0) as usize,
            });
        }
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
