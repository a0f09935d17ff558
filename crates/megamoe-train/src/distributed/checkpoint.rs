//! Checkpoints of a distributed run in the one-rank layout: replicated tensors are taken
//! as they are, sharded optimizer state (`parallel.fsdp` 1/2) is all-gathered over its
//! sharding group, and expert banks and their optimizer state (sharded over E by expert
//! parallelism) are all-gathered over the EP group in rank order, which is expert order.
//! Rank 0 writes the result; the files are those a one-rank run of the same model writes.

use std::collections::{HashMap, HashSet};

use megamoe_optim::{ParamRole, STATE_KINDS};
use megamoe_tensor::Device;

use crate::checkpoint::NamedTensor;
use crate::error::Result;
use crate::trainer::Trainer;

impl Trainer {
    /// Model and optimizer tensors of a checkpoint, in the one-rank layout. Collective
    /// under expert parallelism: every rank calls it at the same points (rank 0 from
    /// [`Trainer::save_checkpoint`], the others from [`Trainer::join_checkpoint`]).
    pub(crate) fn checkpoint_tensors(&self) -> Result<(Vec<NamedTensor>, Vec<NamedTensor>)> {
        let mut model = self.model_tensors()?;
        let mut optimizer = self.optimizer_tensors()?;
        let Some(par) = self
            .parallel
            .as_ref()
            .filter(|p| p.mesh.ep > 1 || p.is_sharded())
        else {
            return Ok((model, optimizer));
        };
        let mut experts = HashSet::new();
        let mut index = HashMap::new();
        self.params.visit(&mut |name, t, role| {
            if role == ParamRole::ExpertBank {
                experts.insert(name.to_string());
            }
            let full = par.full_rows(index.len()).unwrap_or(t.dims()[0]);
            index.insert(name.to_string(), (index.len(), full));
        });
        // Sharded optimizer state: this rank's rows gathered over the sharding group.
        for t in optimizer.iter_mut() {
            let Some(&(i, rows)) = index.get(param_of(&t.name)) else {
                continue;
            };
            if par.is_sharded() {
                let full = par.gather_rows(i, &t.to_tensor(Device::Cpu)?, rows)?;
                *t = NamedTensor::from_tensor(t.name.clone(), &full)?;
            }
        }
        if par.mesh.ep == 1 {
            return Ok((model, optimizer));
        }
        for t in model.iter_mut().chain(optimizer.iter_mut()) {
            if experts.contains(param_of(&t.name)) {
                let full = par.ep.all_gather(&t.to_tensor(Device::Cpu)?)?;
                *t = NamedTensor::from_tensor(t.name.clone(), &full)?;
            }
        }
        Ok((model, optimizer))
    }

    /// A non-writing rank's part of a checkpoint save: the expert gathers of
    /// [`Trainer::save_checkpoint`] on rank 0 (nothing to do without expert parallelism).
    pub fn join_checkpoint(&self) -> Result<()> {
        if self
            .parallel
            .as_ref()
            .is_some_and(|p| p.mesh.ep > 1 || p.is_sharded())
        {
            self.checkpoint_tensors()?;
        }
        Ok(())
    }
}

/// The parameter an optimizer state tensor `<kind>.<parameter>` belongs to (a model
/// tensor's own name otherwise).
fn param_of(name: &str) -> &str {
    STATE_KINDS
        .iter()
        .find_map(|k| name.strip_prefix(k).and_then(|r| r.strip_prefix('.')))
        .unwrap_or(name)
}
