//! Text generation: [`Model::generate`] continues a prompt token by token, re-running the
//! forward on the last `seq_len` tokens (no KV cache; a quick sample, not a server).
//!
//! [`TokenSampler`] is the per-token part of it — the context's ids and the model built
//! for its length, then the draw of the next token from the last logits — for callers
//! that run the forward themselves: a pipeline runs it stage by stage and only the rank
//! holding the head draws, so both paths give the same tokens for the same logits.

use megamoe_tensor::{DType, Device, Tensor, IGNORE_INDEX};

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::{Model, ModelParams, Sampling};

/// The context, model and next-token draw of one generation (see the module doc).
pub struct TokenSampler<'m> {
    model: &'m Model,
    /// Models built for contexts shorter than `seq_len`, by length (MoE layers need N to
    /// be a multiple of their seq_len; same parameters).
    by_len: Vec<Option<Model>>,
    sampling: Sampling,
    rng: u64,
    device: Device,
}

impl<'m> TokenSampler<'m> {
    /// A sampler over `model` drawing with `sampling`; ids are built on `device`.
    pub fn new(model: &'m Model, sampling: Sampling, device: Device) -> TokenSampler<'m> {
        TokenSampler {
            model,
            by_len: (0..=model.cfg.seq_len).map(|_| None).collect(),
            sampling,
            rng: sampling.seed ^ 0x9E37_79B9_7F4A_7C15,
            device,
        }
    }

    /// The context of the tokens so far (their last `seq_len`) as `[1, t]` ids and
    /// ignored targets, and the model to run it: `model` itself for a full context, a
    /// copy built for length `t` (same dispatcher, gather and TP hooks) otherwise.
    pub fn context(&mut self, tokens: &[i32]) -> Result<(&Model, Tensor, Tensor)> {
        let seq_len = self.model.cfg.seq_len;
        let start = tokens.len().saturating_sub(seq_len);
        let ctx = &tokens[start..];
        let t = ctx.len();
        if t == 0 {
            return Err(Error::Input {
                arg: "prompt",
                got: vec![0],
                rule: "must hold at least one token",
            });
        }
        let ids = Tensor::from_vec_i32(ctx.to_vec(), [1, t], self.device)?;
        let targets = Tensor::full([1, t], IGNORE_INDEX as f32, DType::I32, self.device)?;
        if t == seq_len {
            return Ok((self.model, ids, targets));
        }
        let slot = &mut self.by_len[t];
        if slot.is_none() {
            let base = self.model;
            let mut short = Model::new(ModelConfig {
                seq_len: t,
                ..base.cfg.clone()
            })?;
            if let Some(d) = &base.moe_dispatcher {
                short.set_moe_dispatcher(d.clone())?;
            }
            short.block_gather = base.block_gather.clone();
            if let Some(tp) = &base.tp {
                short.set_tensor_parallel(tp.clone())?;
            }
            *slot = Some(short);
        }
        match slot {
            Some(m) => Ok((m, ids, targets)),
            None => Err(Error::Input {
                arg: "context",
                got: vec![t],
                rule: "a model for the context length was just built",
            }),
        }
    }

    /// The next token from `logits [t, V]` of a context: its last row, greedy at
    /// temperature 0, else drawn from softmax(logits / temperature) with this sampler's RNG.
    pub fn pick(&mut self, logits: &Tensor) -> Result<i32> {
        let t = logits.dims().first().copied().unwrap_or(0);
        if t == 0 {
            return Err(Error::Input {
                arg: "logits",
                got: logits.dims().to_vec(),
                rule: "must hold at least one row",
            });
        }
        let last = logits.narrow(0, t - 1, 1)?;
        if self.sampling.temperature <= 0.0 {
            // SYNC: the sampled id decides the next input.
            return Ok(last.topk(1)?.1.to_host_i32()?[0]);
        }
        // SYNC: the sampled id decides the next input.
        let probs = last
            .scale(1.0 / self.sampling.temperature)?
            .softmax()?
            .to_host_f32()?;
        self.rng = splitmix(self.rng);
        let u = (self.rng >> 11) as f64 / (1u64 << 53) as f64;
        let mut acc = 0.0f64;
        let mut pick = probs.len() - 1;
        for (i, &pr) in probs.iter().enumerate() {
            acc += pr as f64;
            if u < acc {
                pick = i;
                break;
            }
        }
        Ok(pick as i32)
    }
}

impl Model {
    /// Continues `prompt` by `n` tokens (greedy at temperature 0), re-running the forward on
    /// the last `seq_len` tokens each step (no KV cache; a quick sample, not a server).
    pub fn generate(
        &self,
        p: &ModelParams,
        prompt: &[i32],
        n: usize,
        sampling: Sampling,
    ) -> Result<Vec<i32>> {
        if prompt.is_empty() {
            return Err(Error::Input {
                arg: "prompt",
                got: vec![0],
                rule: "must hold at least one token",
            });
        }
        let mut out = prompt.to_vec();
        let mut sampler = TokenSampler::new(self, sampling, p.embed_tokens.device());
        for _ in 0..n {
            let (model, ids, targets) = sampler.context(&out)?;
            let fwd = model.forward(p, &ids, &targets, usize::MAX)?;
            let next = sampler.pick(&fwd.logits)?;
            out.push(next);
        }
        Ok(out)
    }
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
