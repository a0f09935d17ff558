//! The per-layer parameter hook of fully sharded training (ZeRO-3 / FSDP2): when the
//! parameters given to the model hold only this rank's dim-0 rows of each block's
//! tensors, a [`BlockGather`] installed with [`Model::set_block_gather`] returns a block's
//! full parameters right before the block runs — its forward, and again its backward
//! (recompute and input gradients) — and the model drops them as soon as the block is
//! done. While a block runs, the model asks the hook to start gathering the next block
//! it will run ([`BlockGather::prefetch_block`]: the following block in the forward,
//! the preceding one in the backward), so a communicator that overlaps can move the
//! next block's rows during this block's compute; at most two blocks are full at once.
//! Without a hook the parameters are used as they are.

use std::borrow::Cow;
use std::sync::Arc;

use crate::block::BlockParams;
use crate::error::Result;
use crate::model::Model;

/// Gives a block's full parameters from this rank's rows of them.
pub trait BlockGather: Send + Sync + std::fmt::Debug {
    /// Block `layer`'s full parameters; `local` holds this rank's rows. Collective in a
    /// distributed run: every rank calls it for the same layers in the same order.
    fn gather_block(&self, layer: usize, local: &BlockParams) -> Result<BlockParams>;

    /// Starts gathering block `layer` ahead of its [`BlockGather::gather_block`], which
    /// then completes it (the FSDP2 prefetch). Collective like `gather_block`. The default
    /// does nothing.
    fn prefetch_block(&self, layer: usize, local: &BlockParams) -> Result<()> {
        let _ = (layer, local);
        Ok(())
    }
}

impl Model {
    /// Installs `gather`: every block's parameters go through it before the block's
    /// forward and before its backward (see the module docs).
    pub fn set_block_gather(&mut self, gather: Arc<dyn BlockGather>) {
        self.block_gather = Some(gather);
    }

    /// Starts the hook's gather of block `layer` (no effect without a hook).
    pub(crate) fn prefetch_block(&self, layer: usize, local: Option<&BlockParams>) -> Result<()> {
        match (&self.block_gather, local) {
            (Some(g), Some(local)) => g.prefetch_block(layer, local),
            _ => Ok(()),
        }
    }

    /// The parameters block `layer` runs with: `local` itself, or the hook's full copy.
    pub(crate) fn block_params<'a>(
        &self,
        layer: usize,
        local: &'a BlockParams,
    ) -> Result<Cow<'a, BlockParams>> {
        match &self.block_gather {
            Some(g) => Ok(Cow::Owned(g.gather_block(layer, local)?)),
            None => Ok(Cow::Borrowed(local)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use megamoe_plan::{Plan, Recompute};
    use megamoe_tensor::{Device, Tensor};

    use super::*;
    use crate::config::ModelConfig;
    use crate::model::ModelParams;

    /// Gives the blocks of `full`, checking that the model passes this rank's rows.
    #[derive(Debug)]
    struct FromFull {
        full: ModelParams,
        calls: AtomicUsize,
        prefetched: std::sync::Mutex<Vec<usize>>,
        prefetches: AtomicUsize,
    }

    impl BlockGather for FromFull {
        fn gather_block(&self, layer: usize, local: &BlockParams) -> Result<BlockParams> {
            let mut first_rows = true;
            local.visit("", &mut |_, t, _| first_rows &= t.dims()[0] <= 1);
            assert!(
                first_rows,
                "layer {layer}: the model passed the rows it was given"
            );
            self.calls.fetch_add(1, Ordering::SeqCst);
            let mut pre = self.prefetched.lock().unwrap();
            // Every gather but the first of a pass completes the prefetch made just before.
            assert!(
                pre.is_empty() || pre.pop() == Some(layer),
                "layer {layer} prefetched"
            );
            Ok(self.full.layers[layer].clone())
        }

        fn prefetch_block(&self, layer: usize, _: &BlockParams) -> Result<()> {
            self.prefetched.lock().unwrap().push(layer);
            self.prefetches.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    fn first_rows(p: &ModelParams) -> ModelParams {
        let mut rows = p.clone();
        for l in &mut rows.layers {
            l.visit_mut("", &mut |_, t, _| *t = t.narrow(0, 0, 1).unwrap());
        }
        rows
    }

    fn grads(model: &Model, p: &ModelParams, ids: &Tensor, full: &ModelParams) -> (f32, Vec<f32>) {
        let out = model.forward(p, ids, ids, 0).unwrap();
        let loss = out.losses.total.to_scalar_f32().unwrap();
        let mut g = full.zeros_like().unwrap();
        model.backward(p, out.saved, &mut g, 1.0).unwrap();
        let mut flat = Vec::new();
        g.visit(&mut |_, t, _| flat.extend(t.to_host_f32().unwrap()));
        (loss, flat)
    }

    /// Rows in, the hook's full blocks used: the same loss and gradients as the full
    /// parameters, each block gathered once for its forward and once for its backward
    /// (recompute included).
    #[test]
    fn blocks_run_on_the_gathered_parameters() {
        let text = "[model]\nvocab_size = 13\nd_model = 8\nn_layers = 3\nn_heads = 2\n\
                    n_kv_heads = 1\nffn_hidden = 16\nseq_len = 6\n[train]\nglobal_batch = 2\n";
        let plan = Plan::from_toml_str(text, &[], Some(1)).unwrap();
        for recompute in [Recompute::None, Recompute::Full] {
            let mut cfg = ModelConfig::from_plan(&plan).unwrap();
            cfg.recompute = recompute;
            let plain = Model::new(cfg).unwrap();
            let full = plain.init_params().unwrap();
            let ids: Vec<i32> = (0..12).map(|i| (i * 5 + 1) % 13).collect();
            let ids = Tensor::from_vec_i32(ids, [2, 6], Device::Cpu).unwrap();
            let want = grads(&plain, &full, &ids, &full);
            let hook = Arc::new(FromFull {
                full: full.clone(),
                calls: AtomicUsize::new(0),
                prefetched: Default::default(),
                prefetches: AtomicUsize::new(0),
            });
            let mut sharded = plain.clone();
            sharded.set_block_gather(hook.clone());
            let got = grads(&sharded, &first_rows(&full), &ids, &full);
            assert_eq!(got.0.to_bits(), want.0.to_bits(), "{recompute:?}");
            assert_eq!(got.1, want.1, "{recompute:?}");
            assert_eq!(hook.calls.load(Ordering::SeqCst), 2 * 3, "{recompute:?}");
            // The next block is prefetched while one runs: layers 1, 2 forward, 1, 0 backward.
            assert_eq!(hook.prefetches.load(Ordering::SeqCst), 4, "{recompute:?}");
            assert!(
                hook.prefetched.lock().unwrap().is_empty(),
                "every prefetch used"
            );
        }
    }
}
