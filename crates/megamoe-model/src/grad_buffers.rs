//! Persistent gradient buffers: [`GradBuffers`] holds one gradient tensor per parameter,
//! allocated once and zeroed in place each step, plus a [`FlatLayout`] that places every
//! parameter at an offset of one flat address space and groups consecutive parameters
//! into contiguous buckets (the unit of a data-parallel all-reduce or reduce-scatter).
//!
//! Buckets are formed in reverse visit order — the order backward finishes gradients (head
//! first, embedding last) — so bucket 0 is ready first and can be reduced while backward
//! still runs. Each bucket is a contiguous element range of the flat layout.
//!
//! Storage today: one tensor per parameter at its named slot; [`GradBuffers::bucket_flat`]
//! concatenates a bucket (a copy). When tensors can alias one buffer with write access
//! through offset views, the slots become views of a single flat tensor and the bucket read
//! becomes free; the layout, names and bucket ranges stay as they are.

use std::ops::Range;

use megamoe_optim::ParamRole;
use megamoe_tensor::Tensor;

use crate::error::{Error, Result};
use crate::model::ModelParams;

/// One parameter's place in the flat layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamSlot {
    /// Global HF-style name.
    pub name: String,
    /// Role (optimizer routing).
    pub role: ParamRole,
    /// Shape.
    pub dims: Vec<usize>,
    /// First element in the flat layout.
    pub offset: usize,
    /// Bucket index.
    pub bucket: usize,
}

impl ParamSlot {
    /// Element range in the flat layout.
    pub fn range(&self) -> Range<usize> {
        self.offset..self.offset + self.dims.iter().product::<usize>()
    }
}

/// A run of consecutive slots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bucket {
    /// Slot indices (visit order).
    pub slots: Range<usize>,
    /// Element range in the flat layout.
    pub elems: Range<usize>,
}

/// Where every parameter sits in one flat buffer, and the buckets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlatLayout {
    slots: Vec<ParamSlot>,
    buckets: Vec<Bucket>,
    numel: usize,
}

impl FlatLayout {
    /// Lays out the tensors `visit` enumerates (in visit order) and cuts buckets of at most
    /// `bucket_elems` elements walking backwards from the last parameter (a larger
    /// parameter gets a bucket of its own). `bucket_elems` must be ≥ 1.
    pub fn new(
        visit: impl FnOnce(&mut dyn FnMut(&str, &Tensor, ParamRole)),
        bucket_elems: usize,
    ) -> Result<FlatLayout> {
        if bucket_elems == 0 {
            return Err(Error::Config {
                field: "bucket_elems",
                value: "0".into(),
                rule: "a gradient bucket holds at least one element",
            });
        }
        let mut slots = Vec::new();
        let mut numel = 0;
        visit(&mut |name, t, role| {
            slots.push(ParamSlot {
                name: name.to_string(),
                role,
                dims: t.dims().to_vec(),
                offset: numel,
                bucket: 0,
            });
            numel += t.numel();
        });
        // Walk backwards, closing a bucket when the next slot would overflow it.
        let mut cuts = Vec::new(); // (start slot, end slot), built last-first
        let mut end = slots.len();
        let mut size = 0;
        for i in (0..slots.len()).rev() {
            let n = slots[i].range().len();
            if size > 0 && size + n > bucket_elems {
                cuts.push(i + 1..end);
                end = i + 1;
                size = 0;
            }
            size += n;
        }
        if end > 0 {
            cuts.push(0..end);
        }
        let buckets: Vec<Bucket> = cuts
            .into_iter()
            .map(|r| Bucket {
                elems: slots[r.start].offset..slots[r.end - 1].range().end,
                slots: r,
            })
            .collect();
        for (b, bucket) in buckets.iter().enumerate() {
            for s in &mut slots[bucket.slots.clone()] {
                s.bucket = b;
            }
        }
        Ok(FlatLayout {
            slots,
            buckets,
            numel,
        })
    }

    /// Every slot, in visit order.
    pub fn slots(&self) -> &[ParamSlot] {
        &self.slots
    }

    /// Buckets, in the order backward completes them.
    pub fn buckets(&self) -> &[Bucket] {
        &self.buckets
    }

    /// Total elements.
    pub fn numel(&self) -> usize {
        self.numel
    }

    /// The slot of `name`.
    pub fn slot(&self, name: &str) -> Option<&ParamSlot> {
        self.slots.iter().find(|s| s.name == name)
    }
}

/// The gradients of a model, allocated once and zeroed in place each step.
#[derive(Debug)]
pub struct GradBuffers {
    layout: FlatLayout,
    grads: ModelParams,
}

impl GradBuffers {
    /// Zero gradients shaped like `params`, with buckets of at most `bucket_elems`.
    pub fn new(params: &ModelParams, bucket_elems: usize) -> Result<GradBuffers> {
        let grads = params.zeros_like()?;
        let layout = FlatLayout::new(|f| grads.visit(f), bucket_elems)?;
        Ok(GradBuffers { layout, grads })
    }

    /// Sets every gradient to zero in place (no allocation while no other handle shares a
    /// buffer).
    pub fn zero(&mut self) -> Result<()> {
        let mut err = None;
        self.grads.visit_mut(&mut |_, t, _| {
            if err.is_none() {
                err = t.fill_in_place(0.0).err();
            }
        });
        match err {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }

    /// The layout.
    pub fn layout(&self) -> &FlatLayout {
        &self.layout
    }

    /// The gradients (the accumulation target of `Model::backward`).
    pub fn grads(&self) -> &ModelParams {
        &self.grads
    }

    /// Mutable gradients.
    pub fn grads_mut(&mut self) -> &mut ModelParams {
        &mut self.grads
    }

    /// The gradient of `name` (its named view).
    pub fn get(&self, name: &str) -> Option<Tensor> {
        let mut out = None;
        self.grads.visit(&mut |n, t, _| {
            if n == name {
                out = Some(t.clone());
            }
        });
        out
    }

    /// Bucket `b` as one flat `[len]` tensor, its slots in layout order.
    pub fn bucket_flat(&self, b: usize) -> Result<Tensor> {
        let bucket = self.layout.buckets.get(b).ok_or(Error::Stage {
            micro_batch: None,
            rule: "no such gradient bucket",
        })?;
        let mut parts = Vec::with_capacity(bucket.slots.len());
        self.grads.visit(&mut |n, t, _| {
            if self.layout.slot(n).is_some_and(|s| s.bucket == b) {
                parts.push(t.clone());
            }
        });
        let flat: Vec<Tensor> = parts
            .iter()
            .map(|t| t.reshape([t.numel()]))
            .collect::<std::result::Result<_, _>>()?;
        let refs: Vec<&Tensor> = flat.iter().collect();
        Ok(Tensor::cat(&refs, 0)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tests::{batch, tiny_plan, ALL_FEATURES};
    use crate::{Model, ModelConfig};

    fn addr(t: &Tensor) -> usize {
        t.storage() as *const _ as usize
    }

    #[test]
    fn layout_tiles_the_flat_space_and_buckets_run_backwards() {
        let model = Model::new(ModelConfig::from_plan(&tiny_plan(ALL_FEATURES)).unwrap()).unwrap();
        let p = model.init_params().unwrap();
        let cap = 300;
        let l = FlatLayout::new(|f| p.visit(f), cap).unwrap();
        assert_eq!(l.numel(), p.numel());
        let mut next = 0;
        let mut names = Vec::new();
        p.visit(&mut |n, _, _| names.push(n.to_string()));
        for (s, n) in l.slots().iter().zip(&names) {
            assert_eq!(&s.name, n);
            assert_eq!(s.offset, next, "{n}: slots are contiguous in visit order");
            next = s.range().end;
        }
        assert_eq!(next, l.numel());
        // Buckets: disjoint, covering, contiguous, ≤ cap unless one slot, last slot first.
        let b = l.buckets();
        assert!(b.len() > 2);
        assert_eq!(
            b[0].slots.end,
            l.slots().len(),
            "bucket 0 holds the last parameters"
        );
        assert_eq!(b.last().unwrap().slots.start, 0);
        for w in b.windows(2) {
            assert_eq!(w[1].slots.end, w[0].slots.start);
            assert_eq!(w[1].elems.end, w[0].elems.start);
        }
        for (i, k) in b.iter().enumerate() {
            assert!(k.elems.len() <= cap || k.slots.len() == 1, "bucket {i}");
            for s in &l.slots()[k.slots.clone()] {
                assert_eq!(s.bucket, i);
            }
        }
        assert!(FlatLayout::new(|f| p.visit(f), 0).is_err());
    }

    #[test]
    fn buffers_are_reused_across_steps_and_give_fresh_buffer_gradients() {
        let model = Model::new(ModelConfig::from_plan(&tiny_plan(ALL_FEATURES)).unwrap()).unwrap();
        let p = model.init_params().unwrap();
        let mut gb = GradBuffers::new(&p, 1 << 10).unwrap();
        let mut addrs = Vec::new();
        gb.grads().visit(&mut |_, t, _| addrs.push(addr(t)));
        for step in 0..2 {
            gb.zero().unwrap();
            let (ids, tg) = batch(2, 6, 13, step);
            for scale in [0.5, 0.5] {
                let out = model.forward(&p, &ids, &tg, 1).unwrap();
                model
                    .backward(&p, out.saved, gb.grads_mut(), scale)
                    .unwrap();
            }
            // Reference: a fresh zero buffer per step.
            let mut fresh = p.zeros_like().unwrap();
            for scale in [0.5, 0.5] {
                let out = model.forward(&p, &ids, &tg, 1).unwrap();
                model.backward(&p, out.saved, &mut fresh, scale).unwrap();
            }
            let mut want = Vec::new();
            fresh.visit(&mut |n, t, _| want.push((n.to_string(), t.to_host_f32().unwrap())));
            let mut i = 0;
            let mut now = Vec::new();
            gb.grads().visit(&mut |n, t, _| {
                assert_eq!(n, want[i].0);
                assert_eq!(t.to_host_f32().unwrap(), want[i].1, "{n}, step {step}");
                now.push(addr(t));
                i += 1;
            });
            assert_eq!(
                now, addrs,
                "step {step}: every gradient buffer reused in place"
            );
        }
        // A bucket read is the concatenation of its slots.
        let flat = gb.bucket_flat(0).unwrap().to_host_f32().unwrap();
        let b0 = gb.layout().buckets()[0].clone();
        assert_eq!(flat.len(), b0.elems.len());
        let first = &gb.layout().slots()[b0.slots.start];
        let g = gb.get(&first.name).unwrap().to_host_f32().unwrap();
        assert_eq!(&flat[..g.len()], &g[..]);
        assert!(gb.bucket_flat(99).is_err());
        gb.zero().unwrap();
        gb.grads().visit(&mut |n, t, _| {
            assert!(t.to_host_f32().unwrap().iter().all(|&v| v == 0.0), "{n}")
        });
    }
}
