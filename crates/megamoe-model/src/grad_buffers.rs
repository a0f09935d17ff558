//! Persistent gradient buffers: [`GradBuffers`] holds a model's gradients in ONE flat
//! write-through buffer (allocated once, zeroed in place each step — or lazily,
//! [`GradBuffers::zero_deferred`]: the first GEMM into a gradient overwrites it), each parameter's gradient
//! a view of it at its [`FlatLayout`] offset, and groups consecutive parameters into
//! contiguous buckets (the unit of a data-parallel all-reduce or reduce-scatter).
//!
//! The backward accumulates into the views in place (`add_assign`, `matmul_acc`,
//! `index_add_rows_acc`, ...), so the writes land in the flat buffer and a bucket is a view of
//! it too ([`GradBuffers::bucket`]: no copy). The aliasing rules are the tensor crate's
//! write-through rules (`megamoe_tensor::Tensor::write_through_zeros`): a gradient handle is
//! a name for its slot, not a snapshot, and must never be replaced by a fresh tensor —
//! [`GradBuffers::zero`] and [`GradBuffers::bucket`] check that every gradient still views
//! its slot ([`Error::GradDetached`] otherwise).
//!
//! Buckets are formed in reverse visit order — the order backward finishes gradients (head
//! first, embedding last) — so bucket 0 is ready first and can be reduced while backward
//! still runs. Each bucket is a contiguous element range of the flat layout, and holds either
//! expert banks only or no expert bank (the two reduce over different rank groups).

use std::ops::Range;

use megamoe_optim::ParamRole;
use megamoe_tensor::{Device, Tensor};

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
    /// parameter gets a bucket of its own; a bucket also ends where expert banks and other
    /// parameters meet). `bucket_elems` must be ≥ 1.
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
        let expert = |s: &ParamSlot| s.role == ParamRole::ExpertBank;
        for i in (0..slots.len()).rev() {
            let n = slots[i].range().len();
            let group_change = i + 1 < end && expert(&slots[i]) != expert(&slots[i + 1]);
            if size > 0 && (size + n > bucket_elems || group_change) {
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

/// The gradients of a model: one flat write-through buffer, a view per parameter, allocated
/// once and zeroed in place each step (see the module doc).
#[derive(Debug)]
pub struct GradBuffers {
    layout: FlatLayout,
    grads: ModelParams,
    /// The `[layout.numel()]` buffer every gradient views; `None` for the separate
    /// buffers of [`GradBuffers::separate`].
    flat: Option<Tensor>,
}

impl GradBuffers {
    /// Zero gradients shaped like `params` (on their device), with buckets of at most
    /// `bucket_elems`.
    pub fn new(params: &ModelParams, bucket_elems: usize) -> Result<GradBuffers> {
        let mut grads = params.zeros_like()?;
        let layout = FlatLayout::new(|f| grads.visit(f), bucket_elems)?;
        let mut device = Device::Cpu;
        params.visit(&mut |_, t, _| device = t.device());
        // SAFETY: the buffer and its views belong to this GradBuffers, i.e. to one trainer
        // (one rank): its backward, reduce, clip and optimizer run on that rank's thread, one
        // after the other. A communicator that hands tensors to other threads copies a
        // write-through view first (megamoe-comm's thread ranks do).
        let flat = unsafe { Tensor::write_through_zeros([layout.numel()], device)? };
        let mut slots = layout.slots().iter();
        let mut err = None;
        grads.visit_mut(&mut |_, t, _| {
            let Some(slot) = slots.next() else { return };
            match flat.view(slot.offset, slot.dims.clone()) {
                Ok(v) if err.is_none() => *t = v,
                Ok(_) => {}
                Err(e) => err = Some(e),
            }
        });
        if let Some(e) = err {
            return Err(e.into());
        }
        Ok(GradBuffers {
            layout,
            grads,
            flat: Some(flat),
        })
    }

    /// One separate zero buffer per parameter, the same layout on paper but no flat buffer
    /// and no bucket views: the reference the flat buffers are checked against (same bits).
    pub fn separate(params: &ModelParams, bucket_elems: usize) -> Result<GradBuffers> {
        let grads = params.zeros_like()?;
        let layout = FlatLayout::new(|f| grads.visit(f), bucket_elems)?;
        Ok(GradBuffers {
            layout,
            grads,
            flat: None,
        })
    }

    /// Sets every gradient to zero in place (one fill of the flat buffer, no allocation).
    pub fn zero(&mut self) -> Result<()> {
        self.check_attached()?;
        match &mut self.flat {
            Some(flat) => flat.fill_in_place(0.0)?,
            None => {
                let mut err = None;
                self.grads.visit_mut(&mut |_, t, _| {
                    if err.is_none() {
                        err = t.fill_in_place(0.0).err();
                    }
                });
                if let Some(e) = err {
                    return Err(e.into());
                }
            }
        }
        Ok(())
    }

    /// Sets every gradient to zero lazily: the flat buffer defers the zeroing of each
    /// gradient's range (megamoe-tensor's `Tensor::defer_zero`), so the first accumulating
    /// GEMM into a gradient overwrites it and only what another op writes first is filled
    /// (that range alone); separate buffers are filled as [`GradBuffers::zero`] fills them.
    /// Reading a gradient still deferred is an error until [`GradBuffers::settle`].
    pub fn zero_deferred(&mut self) -> Result<()> {
        self.check_attached()?;
        match &self.flat {
            Some(flat) => Ok(flat.defer_zero(self.layout.slots().iter().map(|s| s.range()))?),
            None => self.zero(),
        }
    }

    /// Writes the zeros still deferred (the gradients nothing wrote since
    /// [`GradBuffers::zero_deferred`]; one fill per run of adjacent ones): call it after the
    /// backward, before anything reads the gradients (a reduce, the clip, the optimizer,
    /// which reads the flat buffer by address).
    pub fn settle(&self) -> Result<()> {
        if let Some(flat) = &self.flat {
            flat.settle_deferred()?;
        }
        Ok(())
    }

    /// Gradients whose zeroing is still deferred (see [`GradBuffers::zero_deferred`]).
    pub fn deferred_elems(&self) -> usize {
        self.flat.as_ref().map_or(0, Tensor::deferred_elems)
    }

    /// The layout.
    pub fn layout(&self) -> &FlatLayout {
        &self.layout
    }

    /// The gradients (views of the flat buffer; the accumulation target of
    /// `Model::backward`).
    pub fn grads(&self) -> &ModelParams {
        &self.grads
    }

    /// Mutable gradients: accumulate into them in place, never replace one (module doc).
    pub fn grads_mut(&mut self) -> &mut ModelParams {
        &mut self.grads
    }

    /// The whole flat buffer `[numel]`, every gradient at its slot's offset (`None` for
    /// [`GradBuffers::separate`]).
    pub fn flat(&self) -> Option<&Tensor> {
        self.flat.as_ref()
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

    /// Bucket `b` as a `[len]` view of the flat buffer (its slots in layout order; no copy):
    /// reduce it and write the result back into it in place. Its deferred zeros are written
    /// first ([`GradBuffers::zero_deferred`]).
    pub fn bucket(&self, b: usize) -> Result<Tensor> {
        let bucket = self.layout.buckets.get(b).ok_or(Error::Stage {
            micro_batch: None,
            rule: "no such gradient bucket",
        })?;
        self.check_attached()?;
        let flat = self.flat.as_ref().ok_or(Error::Stage {
            micro_batch: None,
            rule: "separate gradient buffers have no bucket views",
        })?;
        let view = flat.view(bucket.elems.start, [bucket.elems.len()])?;
        view.settle_deferred()?;
        Ok(view)
    }

    /// Every gradient still views its slot of the flat buffer.
    fn check_attached(&self) -> Result<()> {
        let Some(flat) = &self.flat else {
            return Ok(());
        };
        let mut slots = self.layout.slots().iter();
        let mut detached = None;
        self.grads.visit(&mut |n, t, _| {
            let ok = slots.next().is_some_and(|s| {
                t.same_storage(flat)
                    && t.layout().offset() == s.offset
                    && t.dims() == s.dims.as_slice()
            });
            if !ok && detached.is_none() {
                detached = Some(n.to_string());
            }
        });
        match detached {
            Some(name) => Err(Error::GradDetached { name }),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tests::{batch, tiny_plan, ALL_FEATURES, MOE};
    use crate::{Model, ModelConfig};

    fn addr(t: &Tensor) -> usize {
        t.storage() as *const _ as usize
    }

    #[test]
    fn each_layers_q_k_v_gradients_lie_back_to_back_in_the_flat_buffer() {
        // The fused q|k|v weight gradient (one GEMM into [q; k; v]) needs this layout.
        let model = Model::new(
            ModelConfig::from_plan(&tiny_plan(&format!("{MOE}{ALL_FEATURES}"))).unwrap(),
        )
        .unwrap();
        let p = model.init_params().unwrap();
        let l = FlatLayout::new(|f| p.visit(f), 300).unwrap();
        let mut layers = 0;
        for (i, s) in l.slots().iter().enumerate() {
            let Some(prefix) = s.name.strip_suffix(".q_proj.weight") else {
                continue;
            };
            let (k, v) = (&l.slots()[i + 1], &l.slots()[i + 2]);
            assert_eq!(k.name, format!("{prefix}.k_proj.weight"));
            assert_eq!(v.name, format!("{prefix}.v_proj.weight"));
            assert_eq!(k.offset, s.range().end, "{prefix}: k follows q");
            assert_eq!(v.offset, k.range().end, "{prefix}: v follows k");
            assert_eq!((s.dims[1], k.dims[1]), (v.dims[1], v.dims[1]));
            layers += 1;
        }
        assert!(layers >= 2, "{layers} attention layers");
    }

    #[test]
    fn layout_tiles_the_flat_space_and_buckets_run_backwards() {
        let model = Model::new(
            ModelConfig::from_plan(&tiny_plan(&format!("{MOE}{ALL_FEATURES}"))).unwrap(),
        )
        .unwrap();
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
            let experts = l.slots()[k.slots.clone()]
                .iter()
                .filter(|s| s.role == ParamRole::ExpertBank)
                .count();
            assert!(
                experts == 0 || experts == k.slots.len(),
                "bucket {i} mixes expert banks and other parameters"
            );
            for s in &l.slots()[k.slots.clone()] {
                assert_eq!(s.bucket, i);
            }
        }
        assert!(
            l.slots().iter().any(|s| s.role == ParamRole::ExpertBank),
            "the model has expert banks"
        );
        assert!(FlatLayout::new(|f| p.visit(f), 0).is_err());
    }

    #[test]
    fn buffers_are_reused_across_steps_and_give_fresh_buffer_gradients() {
        let model = Model::new(
            ModelConfig::from_plan(&tiny_plan(&format!("{MOE}{ALL_FEATURES}"))).unwrap(),
        )
        .unwrap();
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
        // Every gradient is a view of the flat buffer at its slot: what backward wrote
        // through the views is what the flat buffer holds.
        let flat = gb.flat().unwrap().to_host_f32().unwrap();
        assert_eq!(flat.len(), gb.layout().numel());
        for slot in gb.layout().slots() {
            let g = gb.get(&slot.name).unwrap();
            assert!(g.same_storage(gb.flat().unwrap()), "{}", slot.name);
            assert_eq!(g.layout().offset(), slot.offset, "{}", slot.name);
            assert_eq!(
                g.to_host_f32().unwrap(),
                flat[slot.range()],
                "{}",
                slot.name
            );
        }
        assert!(
            flat.iter().any(|&v| v != 0.0),
            "backward wrote into the flat buffer"
        );
        // Buckets are contiguous views: no copy, and a write into a bucket is the gradients'.
        for (b, bucket) in gb.layout().buckets().iter().enumerate() {
            let v = gb.bucket(b).unwrap();
            assert!(v.same_storage(gb.flat().unwrap()));
            assert_eq!(v.layout().offset(), bucket.elems.start);
            assert_eq!(v.to_host_f32().unwrap(), flat[bucket.elems.clone()]);
        }
        assert!(gb.bucket(gb.layout().buckets().len()).is_err());
        let b0 = gb.layout().buckets()[0].clone();
        let mut v = gb.bucket(0).unwrap();
        v.fill_in_place(2.0).unwrap();
        let first = &gb.layout().slots()[b0.slots.start];
        let g = gb.get(&first.name).unwrap().to_host_f32().unwrap();
        assert!(
            g.iter().all(|&x| x == 2.0),
            "a bucket write is the gradient's"
        );
        gb.zero().unwrap();
        assert!(gb
            .flat()
            .unwrap()
            .to_host_f32()
            .unwrap()
            .iter()
            .all(|&v| v == 0.0));
        gb.grads().visit(&mut |n, t, _| {
            assert!(t.to_host_f32().unwrap().iter().all(|&v| v == 0.0), "{n}")
        });
    }

    #[test]
    fn deferred_zeroing_gives_the_bits_of_zeroing_first() {
        // Every feature: tied and MTP parameters get several contributions, norms and the
        // embedding are written by other ops first; two micro-batches (the second
        // accumulates); a stale buffer (NaN, as after a non-finite step) must not leak.
        let model = Model::new(
            ModelConfig::from_plan(&tiny_plan(&format!("{MOE}{ALL_FEATURES}"))).unwrap(),
        )
        .unwrap();
        let p = model.init_params().unwrap();
        let mut eager = GradBuffers::new(&p, 1 << 10).unwrap();
        let mut lazy = GradBuffers::new(&p, 1 << 10).unwrap();
        let mut stale = lazy.flat().unwrap().clone();
        for step in 0..2 {
            stale.fill_in_place(f32::NAN).unwrap();
            eager.zero().unwrap();
            lazy.zero_deferred().unwrap();
            assert_eq!(lazy.deferred_elems(), lazy.layout().numel());
            let (ids, tg) = batch(2, 6, 13, step);
            for gb in [&mut eager, &mut lazy] {
                for scale in [0.5, 0.5] {
                    let out = model.forward(&p, &ids, &tg, 1).unwrap();
                    model
                        .backward(&p, out.saved, gb.grads_mut(), scale)
                        .unwrap();
                }
            }
            lazy.settle().unwrap();
            assert_eq!(lazy.deferred_elems(), 0);
            let bits = |gb: &GradBuffers| -> Vec<u32> {
                let v = gb.flat().unwrap().to_host_f32().unwrap();
                // 0 + (-0) is +0 where the overwrite keeps -0: the same value.
                v.iter()
                    .map(|x| if *x == 0.0 { 0 } else { x.to_bits() })
                    .collect()
            };
            assert_eq!(bits(&lazy), bits(&eager), "step {step}");
        }
        // A gradient no op wrote this step reads zeros once settled, whatever it held.
        stale.fill_in_place(f32::NAN).unwrap();
        lazy.zero_deferred().unwrap();
        let slot = lazy.layout().slots()[1].clone();
        assert!(lazy.get(&slot.name).unwrap().to_host_f32().is_err());
        let v = lazy.bucket(slot.bucket).unwrap().to_host_f32().unwrap();
        assert!(
            v.iter().all(|&x| x == 0.0),
            "a bucket is settled for its reduce"
        );
        lazy.settle().unwrap();
        let g = lazy.get(&slot.name).unwrap().to_host_f32().unwrap();
        assert!(g.iter().all(|&x| x == 0.0));
    }

    #[test]
    fn a_gradient_written_through_its_view_lands_in_the_flat_buffer_and_a_replaced_one_is_named() {
        let model = Model::new(
            ModelConfig::from_plan(&tiny_plan(&format!("{MOE}{ALL_FEATURES}"))).unwrap(),
        )
        .unwrap();
        let p = model.init_params().unwrap();
        let mut gb = GradBuffers::new(&p, 1 << 10).unwrap();
        let slot = gb.layout().slots()[3].clone();
        let mut g = gb.get(&slot.name).unwrap();
        let ones =
            Tensor::ones(slot.dims.clone(), megamoe_tensor::DType::F32, Device::Cpu).unwrap();
        g.add_assign(&ones).unwrap();
        g.add_assign(&ones).unwrap();
        let flat = gb.flat().unwrap().to_host_f32().unwrap();
        for (i, v) in flat.iter().enumerate() {
            let want = if slot.range().contains(&i) { 2.0 } else { 0.0 };
            assert_eq!(*v, want, "element {i}");
        }
        // A backward that replaced a gradient instead of accumulating is caught by name.
        gb.grads_mut().visit_mut(&mut |n, t, _| {
            if n == slot.name {
                *t = t.deep_copy().unwrap();
            }
        });
        match gb.zero() {
            Err(Error::GradDetached { name }) => assert_eq!(name, slot.name),
            other => panic!("expected GradDetached, got {other:?}"),
        }
        assert!(matches!(gb.bucket(0), Err(Error::GradDetached { .. })));
    }
}
