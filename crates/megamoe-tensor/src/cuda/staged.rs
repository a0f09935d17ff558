//! Host-staged families: MoE routing and capacity bookkeeping, and the named RNG. Each call
//! reads its GPU inputs to the host (one counted host read per input tensor), runs the CPU
//! kernel, and uploads the results. Correct and deterministic (the CPU kernels are the
//! spec), but each read is a stream synchronisation: these are the next kernels to move to
//! the device (the static-capacity MoE kernels of megamoe-cuda's `moe` module do this work
//! without host reads).

use std::ops::Range;

use super::CudaBackend;
use crate::backend::{CpuBackend, HostTransfer};
use crate::ops::capacity::{CapacityKernels, CapacityPermutation};
use crate::ops::rng::{InitDist, RngKernels};
use crate::ops::routing::{ExpertPermutation, KeepOrder, RoutingKernels};
use crate::{Result, Shape, Tensor};

impl CudaBackend {
    /// `t` on the host (one counted host read).
    fn down(&self, t: &Tensor) -> Result<Tensor> {
        crate::sync::record_host_read();
        let data = self.to_host(t)?;
        Tensor::from_storage(crate::storage::Storage::Cpu(data), t.shape().clone())
    }

    fn down_opt(&self, t: Option<&Tensor>) -> Result<Option<Tensor>> {
        t.map(|t| self.down(t)).transpose()
    }

    /// A host tensor moved to this GPU.
    fn up(&self, t: Tensor) -> Result<Tensor> {
        let shape = t.shape().clone();
        let data = CpuBackend.to_host(&t)?;
        self.upload(data, shape)
    }
}

impl RoutingKernels for CudaBackend {
    fn group_limited_mask(
        &self,
        sel: &Tensor,
        n_groups: usize,
        topk_groups: usize,
    ) -> Result<Tensor> {
        let s = self.down(sel)?;
        self.up(CpuBackend.group_limited_mask(&s, n_groups, topk_groups)?)
    }

    fn expand_null_slots(&self, z: &Tensor, z_null: &Tensor, n_null: usize) -> Result<Tensor> {
        let (a, b) = (self.down(z)?, self.down(z_null)?);
        self.up(CpuBackend.expand_null_slots(&a, &b, n_null)?)
    }

    fn reduce_null_slots(&self, d_pool: &Tensor, n_real: usize) -> Result<(Tensor, Tensor)> {
        let d = self.down(d_pool)?;
        let (a, b) = CpuBackend.reduce_null_slots(&d, n_real)?;
        Ok((self.up(a)?, self.up(b)?))
    }

    fn real_slot_mask(&self, idx: &Tensor, n_real: usize) -> Result<Tensor> {
        let i = self.down(idx)?;
        self.up(CpuBackend.real_slot_mask(&i, n_real)?)
    }

    fn normalize_rows(&self, g: &Tensor, eps: f32) -> Result<Tensor> {
        let x = self.down(g)?;
        self.up(CpuBackend.normalize_rows(&x, eps)?)
    }

    fn normalize_rows_backward(&self, g: &Tensor, d_n: &Tensor, eps: f32) -> Result<Tensor> {
        let (x, d) = (self.down(g)?, self.down(d_n)?);
        self.up(CpuBackend.normalize_rows_backward(&x, &d, eps)?)
    }

    fn capacity_keep(
        &self,
        idx: &Tensor,
        gates: &Tensor,
        n_real: usize,
        capacity: Option<usize>,
        order: KeepOrder,
    ) -> Result<Tensor> {
        let (i, g) = (self.down(idx)?, self.down(gates)?);
        self.up(CpuBackend.capacity_keep(&i, &g, n_real, capacity, order)?)
    }

    fn slot_counts(
        &self,
        idx: &Tensor,
        keep: Option<&Tensor>,
        n_slots: usize,
        seg_tokens: usize,
    ) -> Result<Tensor> {
        let (i, k) = (self.down(idx)?, self.down_opt(keep)?);
        self.up(CpuBackend.slot_counts(&i, k.as_ref(), n_slots, seg_tokens)?)
    }

    fn sort_by_expert(
        &self,
        idx: &Tensor,
        keep: &Tensor,
        n_real: usize,
    ) -> Result<ExpertPermutation> {
        let (i, k) = (self.down(idx)?, self.down(keep)?);
        let p = CpuBackend.sort_by_expert(&i, &k, n_real)?;
        Ok(ExpertPermutation {
            token: self.up(p.token)?,
            assignment: self.up(p.assignment)?,
            counts: self.up(p.counts)?,
        })
    }

    fn pad_groups(&self, x: &Tensor, counts: &Tensor, capacity: usize) -> Result<Tensor> {
        let (a, c) = (self.down(x)?, self.down(counts)?);
        self.up(CpuBackend.pad_groups(&a, &c, capacity)?)
    }

    fn unpad_groups(
        &self,
        x: &Tensor,
        counts: &Tensor,
        capacity: usize,
        rows: usize,
    ) -> Result<Tensor> {
        let (a, c) = (self.down(x)?, self.down(counts)?);
        self.up(CpuBackend.unpad_groups(&a, &c, capacity, rows)?)
    }

    fn expert_bias_step(&self, counts: &Tensor, rate: f32, centre: bool) -> Result<Tensor> {
        let c = self.down(counts)?;
        self.up(CpuBackend.expert_bias_step(&c, rate, centre)?)
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
        let (i, k) = (self.down(idx)?, self.down(keep)?);
        let p = CpuBackend.capacity_permutation(&i, &k, n_real, capacity)?;
        Ok(CapacityPermutation {
            slot_row: self.up(p.slot_row)?,
            row_token: self.up(p.row_token)?,
            counts: self.up(p.counts)?,
        })
    }

    fn gather_rows_or_zero(&self, x: &Tensor, rows: &Tensor) -> Result<Tensor> {
        let (a, r) = (self.down(x)?, self.down(rows)?);
        self.up(CpuBackend.gather_rows_or_zero(&a, &r)?)
    }

    fn combine_slots(
        &self,
        rows: &Tensor,
        slot_row: &Tensor,
        weights: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (r, s, w) = (
            self.down(rows)?,
            self.down(slot_row)?,
            self.down_opt(weights)?,
        );
        self.up(CpuBackend.combine_slots(&r, &s, w.as_ref())?)
    }

    fn combine_slots_backward(
        &self,
        rows: &Tensor,
        d_y: &Tensor,
        slot_row: &Tensor,
        weights: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let (r, d, s, w) = (
            self.down(rows)?,
            self.down(d_y)?,
            self.down(slot_row)?,
            self.down(weights)?,
        );
        let (a, b) = CpuBackend.combine_slots_backward(&r, &d, &s, &w)?;
        Ok((self.up(a)?, self.up(b)?))
    }
}

impl RngKernels for CudaBackend {
    /// Drawn on the host (the counter RNG's bits are defined there) and uploaded: no
    /// device read, parameters initialise identically on every backend.
    fn rand_named_slice(
        &self,
        seed: u64,
        name: &str,
        global_shape: &Shape,
        dim: usize,
        range: Range<usize>,
        dist: InitDist,
    ) -> Result<Tensor> {
        self.up(CpuBackend.rand_named_slice(seed, name, global_shape, dim, range, dist)?)
    }
}
