//! The parameters of one model chunk ([`ChunkParams`], also its gradients) and the split /
//! join between a whole [`ModelParams`] and per-chunk sets.
//!
//! A chunk holds exactly the tensors its part of the model reads, under their GLOBAL
//! names (`model.layers.{layer_offset + i}.*`), so a pipeline rank that owns one chunk
//! names, checkpoints and shards its parameters as the whole model would. A parameter
//! read by several chunks — the embedding, used by the first chunk for the input and by
//! the head chunk for a tied LM head or MTP — is *shared*: each chunk holds a handle, and
//! their gradients are summed before the optimizer step ([`ModelParams::join`] with
//! [`Shared::Sum`], or an all-reduce between the owning ranks).

use std::collections::BTreeMap;

use megamoe_optim::ParamRole;
use megamoe_tensor::Tensor;

use crate::block::BlockParams;
use crate::chunk::ChunkSpec;
use crate::error::{Error, Result};
use crate::model::ModelParams;
use crate::mtp::MtpParams;

/// Name of the token embedding.
pub const EMBED_NAME: &str = "model.embed_tokens.weight";

/// The weights (or gradients) of one chunk.
#[derive(Debug, Clone)]
pub struct ChunkParams {
    /// Global index of `layers[0]`.
    pub layer_offset: usize,
    /// `model.embed_tokens.weight [V, H]`: on the input chunk, and on the head chunk
    /// when the head is tied or MTP is on.
    pub embed_tokens: Option<Tensor>,
    /// `model.layers.{layer_offset + i}.*`.
    pub layers: Vec<BlockParams>,
    /// `model.norm.weight [H]` (head chunk).
    pub norm: Option<Tensor>,
    /// `lm_head.weight [V, H]` (head chunk, untied).
    pub lm_head: Option<Tensor>,
    /// `mtp.*` (head chunk).
    pub mtp: Option<MtpParams>,
}

impl ChunkParams {
    /// Every tensor with its global HF-style name and role (the order of
    /// [`ModelParams::visit`] restricted to this chunk).
    pub fn visit(&self, f: &mut dyn FnMut(&str, &Tensor, ParamRole)) {
        if let Some(e) = &self.embed_tokens {
            f(EMBED_NAME, e, ParamRole::Embedding);
        }
        for (i, l) in self.layers.iter().enumerate() {
            l.visit(&format!("model.layers.{}", self.layer_offset + i), f);
        }
        if let Some(n) = &self.norm {
            f("model.norm.weight", n, ParamRole::Norm);
        }
        if let Some(h) = &self.lm_head {
            f("lm_head.weight", h, ParamRole::Head);
        }
        if let Some(m) = &self.mtp {
            m.visit("mtp", f);
        }
    }

    /// Mutable twin of [`ChunkParams::visit`] (same names, same order).
    pub fn visit_mut(&mut self, f: &mut dyn FnMut(&str, &mut Tensor, ParamRole)) {
        if let Some(e) = &mut self.embed_tokens {
            f(EMBED_NAME, e, ParamRole::Embedding);
        }
        for (i, l) in self.layers.iter_mut().enumerate() {
            l.visit_mut(&format!("model.layers.{}", self.layer_offset + i), f);
        }
        if let Some(n) = &mut self.norm {
            f("model.norm.weight", n, ParamRole::Norm);
        }
        if let Some(h) = &mut self.lm_head {
            f("lm_head.weight", h, ParamRole::Head);
        }
        if let Some(m) = &mut self.mtp {
            m.visit_mut("mtp", f);
        }
    }

    /// Global names of the tensors this chunk holds.
    pub fn names(&self) -> Vec<String> {
        let mut v = Vec::new();
        self.visit(&mut |n, _, _| v.push(n.to_string()));
        v
    }

    fn missing(what: &'static str) -> Error {
        Error::Stage {
            micro_batch: None,
            rule: what,
        }
    }

    /// The inverse of `ModelParams::into_whole_chunk`.
    pub(crate) fn into_whole_model(self) -> Result<ModelParams> {
        ModelParams::join(vec![self], Shared::First)
    }

    /// The embedding (input or shared head use).
    pub(crate) fn embed(&self) -> Result<&Tensor> {
        self.embed_tokens
            .as_ref()
            .ok_or_else(|| Self::missing("the chunk needs model.embed_tokens.weight"))
    }

    pub(crate) fn embed_mut(&mut self) -> Result<&mut Tensor> {
        self.embed_tokens
            .as_mut()
            .ok_or_else(|| Self::missing("the chunk needs model.embed_tokens.weight"))
    }

    pub(crate) fn final_norm(&self) -> Result<&Tensor> {
        self.norm
            .as_ref()
            .ok_or_else(|| Self::missing("the head chunk needs model.norm.weight"))
    }

    /// The LM head weight (the embedding when tied).
    pub(crate) fn head(&self) -> Result<&Tensor> {
        match &self.lm_head {
            Some(h) => Ok(h),
            None => self.embed(),
        }
    }
}

/// A parameter held by more than one chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedParam {
    /// Global name.
    pub name: String,
    /// Indices of the chunks holding it, ascending.
    pub chunks: Vec<usize>,
}

/// The parameters held by more than one of `chunks` (their gradients must be summed
/// before the optimizer step; their values must stay equal).
pub fn shared_params(chunks: &[ChunkParams]) -> Vec<SharedParam> {
    let mut by_name: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, c) in chunks.iter().enumerate() {
        for n in c.names() {
            by_name.entry(n).or_default().push(i);
        }
    }
    by_name
        .into_iter()
        .filter(|(_, c)| c.len() > 1)
        .map(|(name, chunks)| SharedParam { name, chunks })
        .collect()
}

/// How [`ModelParams::join`] treats a tensor several chunks hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shared {
    /// Take the copy of the first chunk holding it (parameter values: all copies equal).
    First,
    /// Sum the copies in chunk order (gradients).
    Sum,
}

impl ModelParams {
    /// A stand-in left behind while the tensors are moved into a chunk view.
    pub(crate) fn placeholder(&self) -> Result<ModelParams> {
        let e = Tensor::zeros([0], megamoe_tensor::DType::F32, self.norm.device())?;
        Ok(ModelParams {
            embed_tokens: e.clone(),
            layers: Vec::new(),
            norm: e,
            lm_head: None,
            mtp: None,
        })
    }

    /// The whole model as one chunk, moving every tensor (no handle is cloned).
    pub(crate) fn into_whole_chunk(self) -> ChunkParams {
        ChunkParams {
            layer_offset: 0,
            embed_tokens: Some(self.embed_tokens),
            layers: self.layers,
            norm: Some(self.norm),
            lm_head: self.lm_head,
            mtp: self.mtp,
        }
    }

    /// Whether a chunk described by `spec` reads the embedding.
    fn chunk_needs_embed(&self, spec: &ChunkSpec) -> bool {
        spec.embed || (spec.head && (self.lm_head.is_none() || self.mtp.is_some()))
    }

    /// Splits into one [`ChunkParams`] per spec (handles: O(1) per tensor, no copy).
    /// The specs must tile the model (see [`ChunkSpec::validate_tiling`]).
    pub fn split(&self, specs: &[ChunkSpec]) -> Result<Vec<ChunkParams>> {
        ChunkSpec::validate_tiling(specs, self.layers.len())?;
        Ok(specs
            .iter()
            .map(|s| ChunkParams {
                layer_offset: s.layers.start,
                embed_tokens: self.chunk_needs_embed(s).then(|| self.embed_tokens.clone()),
                layers: self.layers[s.layers.clone()].to_vec(),
                norm: s.head.then(|| self.norm.clone()),
                lm_head: if s.head { self.lm_head.clone() } else { None },
                mtp: if s.head { self.mtp.clone() } else { None },
            })
            .collect())
    }

    /// The inverse of [`ModelParams::split`]: layers in order, shared tensors per `shared`.
    pub fn join(chunks: Vec<ChunkParams>, shared: Shared) -> Result<ModelParams> {
        let mut embed: Option<Tensor> = None;
        let mut layers = Vec::new();
        let (mut norm, mut lm_head, mut mtp) = (None, None, None);
        for c in chunks {
            if c.layer_offset != layers.len() {
                return Err(Error::Stage {
                    micro_batch: None,
                    rule: "chunks must hold consecutive layers in order",
                });
            }
            layers.extend(c.layers);
            if let Some(e) = c.embed_tokens {
                match (&mut embed, shared) {
                    (None, _) => embed = Some(e),
                    (Some(_), Shared::First) => {}
                    (Some(acc), Shared::Sum) => acc.add_assign(&e)?,
                }
            }
            norm = norm.or(c.norm);
            lm_head = lm_head.or(c.lm_head);
            mtp = mtp.or(c.mtp);
        }
        match (embed, norm) {
            (Some(embed_tokens), Some(norm)) => Ok(ModelParams {
                embed_tokens,
                layers,
                norm,
                lm_head,
                mtp,
            }),
            _ => Err(Error::Stage {
                micro_batch: None,
                rule: "the chunks must include the embedding and the head",
            }),
        }
    }
}
