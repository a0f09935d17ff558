//! Forward-only pipeline passes: held-out evaluation and text sampling on pipeline ranks
//! that hold only their own stages.
//!
//! ```text
//! inputs → model stage 0 → 1 → … → head     each model stage run by the lowest rank
//!                                             holding it (DualPipe's mirror idles);
//!                                             carries cross ranks as pipeline messages,
//!                                             stay local between two stages of one rank
//! head                                        loss / logits of each input
//! result                                      broadcast from the head's rank over the
//!                                             pipeline group: every rank returns it
//! ```
//! Each rank runs its stages in model-stage order, every input through a stage before
//! the next stage (sends are buffered, so the inputs stream down the pipeline). A chunk's
//! forward is bit-identical to the same layers of [`Model::forward`], so the eval loss and
//! the sampled tokens are one rank's. Under expert parallelism the ranks of a stage's EP
//! group run the same inputs, so their all-to-alls pair up as in training.

use megamoe_comm::Communicator;
use megamoe_model::{ChunkCarry, ChunkForward, Model, Sampling, TokenSampler};
use megamoe_pipeline::executor::{BoxError, ExecError};
use megamoe_pipeline::Transport;
use megamoe_tensor::{Device, Tensor};

use super::pipeline::PipelineRank;
use super::wire::{CommTransport, Wire};
use crate::error::{Error, Result};

impl PipelineRank {
    /// The rank running model stage `ms` in a forward-only pass: the lowest holding it.
    fn runner(&self, ms: usize) -> Option<usize> {
        let map = &self.schedule.stage_map;
        (0..map.stages())
            .filter(|&s| map.model_stage(s) == Some(ms))
            .filter_map(|s| map.rank(s))
            .min()
    }

    /// Runs `inputs` (`[B, T]` ids and targets each) forward through every model stage of
    /// `model` (this rank's stage parameters; `model` may be a copy built for another
    /// sequence length). Returns the head stage's forwards on the head's rank, `None`
    /// elsewhere. Collective over the pipeline group `comm`.
    fn forward_only(
        &self,
        comm: &dyn Communicator,
        model: &Model,
        inputs: &[(Tensor, Tensor)],
        step: usize,
    ) -> Result<Option<Vec<ChunkForward>>> {
        let n_stages = self.specs.len();
        let mut transport = CommTransport::new(comm);
        let mut local: Vec<Option<ChunkCarry>> = Vec::new();
        let mut head = None;
        // With fsdp 3 the rows, the tensors outside the blocks gathered (collective over
        // the stage's data groups, whose ranks all run this pass).
        let working = self.working_params()?;
        for ms in 0..n_stages {
            if self.runner(ms) != Some(self.rank) {
                continue;
            }
            let params = working.get(&ms).ok_or_else(|| missing_stage(ms))?;
            let chunk = model.chunk(self.specs[ms].clone())?;
            let prev = ms.checked_sub(1).and_then(|p| self.runner(p));
            let next = self.runner(ms + 1);
            let is_head = ms + 1 == n_stages;
            let mut carried = std::mem::take(&mut local);
            let mut outputs = Vec::new();
            for (i, (ids, targets)) in inputs.iter().enumerate() {
                let carry = match prev {
                    None => None,
                    Some(p) if p == self.rank => carried.get_mut(i).and_then(Option::take),
                    Some(p) => match transport
                        .recv(p)
                        .map_err(|e| transfer(self.rank, p, "receive", e))?
                    {
                        Wire::Carry(c) => Some(c),
                        other => {
                            return Err(Error::TrainConfig {
                                field: "pipeline message",
                                value: other.name().to_string(),
                                rule: format!(
                                    "model stage {ms} expects a forward carry from rank {p}"
                                ),
                            })
                        }
                    },
                };
                if prev.is_some() && carry.is_none() {
                    return Err(missing_stage(ms));
                }
                let (fwd, _saved) = chunk.forward(params, ids, targets, carry, step)?;
                if is_head {
                    outputs.push(fwd);
                    continue;
                }
                let c = fwd.carry.ok_or_else(|| missing_stage(ms))?;
                match next {
                    Some(r) if r == self.rank => local.push(Some(c)),
                    Some(r) => transport
                        .send(r, Wire::Carry(c))
                        .map_err(|e| transfer(self.rank, r, "send", e))?,
                    None => return Err(missing_stage(ms + 1)),
                }
            }
            if is_head {
                head = Some(outputs);
            }
        }
        Ok(head)
    }

    /// The LM loss (mean CE over the tokens) of each `inputs` batch, as one rank's
    /// [`Model::forward`] computes it at optimizer step `step`, on every rank of the
    /// pipeline group `comm`. Collective over `comm`.
    pub(crate) fn eval_losses(
        &self,
        comm: &dyn Communicator,
        inputs: &[(Tensor, Tensor)],
        step: usize,
    ) -> Result<Vec<f32>> {
        let head = self.forward_only(comm, &self.model, inputs, step)?;
        let root = self.head_runner()?;
        let values = match head {
            Some(outs) => outs
                .iter()
                .map(|f| match &f.losses {
                    // SYNC: the eval loss is a host number.
                    Some(l) => Ok(l.lm_loss.to_scalar_f32()?),
                    None => Err(missing_stage(self.specs.len() - 1)),
                })
                .collect::<Result<Vec<f32>>>()?,
            None => vec![0.0; inputs.len()],
        };
        let n = values.len();
        let t = Tensor::from_vec_f32(values, [n], Device::Cpu)?;
        Ok(comm.broadcast(&t, root)?.to_host_f32()?)
    }

    /// Continues `prompt` by `n` tokens as one rank's [`Model::generate`] does with the
    /// same `sampling`: each token's context runs forward through the stages, the head's
    /// rank draws the next token from the last logits and broadcasts it. Every rank of the
    /// pipeline group `comm` returns the same tokens. Collective over `comm`.
    pub(crate) fn generate(
        &self,
        comm: &dyn Communicator,
        prompt: &[i32],
        n: usize,
        sampling: Sampling,
    ) -> Result<Vec<i32>> {
        let root = self.head_runner()?;
        let mut out = prompt.to_vec();
        let mut sampler = TokenSampler::new(&self.model, sampling, Device::Cpu);
        for _ in 0..n {
            let (model, ids, targets) = sampler.context(&out)?;
            let head = self.forward_only(comm, model, &[(ids, targets)], usize::MAX)?;
            let next = match head.as_deref() {
                Some([f]) => {
                    let logits = f
                        .logits
                        .as_ref()
                        .ok_or_else(|| missing_stage(self.specs.len() - 1))?;
                    sampler.pick(logits)?
                }
                _ => 0,
            };
            let t = Tensor::from_vec_i32(vec![next], [1], Device::Cpu)?;
            out.push(comm.broadcast(&t, root)?.to_host_i32()?[0]);
        }
        Ok(out)
    }

    fn head_runner(&self) -> Result<usize> {
        let head = self.specs.len().saturating_sub(1);
        self.runner(head).ok_or_else(|| missing_stage(head))
    }
}

fn missing_stage(ms: usize) -> Error {
    Error::TrainConfig {
        field: "parallel.schedule",
        value: format!("model stage {ms}"),
        rule: "a forward-only pass needs each model stage's parameters and input on the \
               rank running it"
            .into(),
    }
}

fn transfer(rank: usize, peer: usize, what: &str, source: BoxError) -> Error {
    Error::PipelineRun(ExecError::Transport {
        rank,
        peer,
        action: format!("forward-only carry {what}"),
        source,
    })
}
