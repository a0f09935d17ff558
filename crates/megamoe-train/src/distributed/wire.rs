//! What travels between pipeline ranks ([`Wire`]) and the executor's
//! [`Transport`] over a [`Communicator`] ([`CommTransport`]): every message is a
//! list of tensors preceded by a small i32 header (kind, which optional parts
//! are present, dtype and dims of each tensor), so the receiver can size its
//! buffers as the communicator requires. The same transport runs over thread
//! ranks and MPI processes.

use megamoe_comm::Communicator;
use megamoe_model::{ChunkCarry, ChunkCarryGrad};
use megamoe_pipeline::executor::BoxError;
use megamoe_pipeline::Transport;
use megamoe_tensor::{DType, Device, Tensor};

/// Tag of pipeline messages (the communicator keeps them in order per pair of ranks).
const PIPELINE_TAG: u32 = 7;

/// One pipeline message.
#[derive(Debug, Clone)]
pub enum Wire {
    /// Forward: a stage's output, the next stage's input.
    Carry(ChunkCarry),
    /// Backward: the gradient of a stage's input, the previous stage's output gradient.
    Grad(ChunkCarryGrad),
    /// Gradients of parameters several stages hold (summed before the step).
    Grads(Vec<Tensor>),
    /// A chain's last stage returns this from forward: its loss stays on its rank.
    Loss,
}

impl Wire {
    /// Lower-case name, for errors.
    pub fn name(&self) -> &'static str {
        match self {
            Wire::Carry(_) => "forward carry",
            Wire::Grad(_) => "carry gradient",
            Wire::Grads(_) => "shared gradients",
            Wire::Loss => "loss marker",
        }
    }

    /// (kind, presence bits, tensors).
    fn into_parts(self) -> (i32, i32, Vec<Tensor>) {
        match self {
            Wire::Carry(c) => {
                let bits =
                    i32::from(c.depth_sum.is_some()) | (i32::from(c.layers_used.is_some()) << 1);
                let mut v = vec![c.hidden, c.aux, c.z, c.gate_penalty];
                v.extend(c.depth_sum);
                v.extend(c.layers_used);
                (0, bits, v)
            }
            Wire::Grad(g) => {
                let bits = i32::from(g.d_depth.is_some());
                let mut v = vec![g.d_hidden];
                v.extend(g.d_depth);
                (1, bits, v)
            }
            Wire::Grads(v) => (2, 0, v),
            Wire::Loss => (3, 0, Vec::new()),
        }
    }

    fn from_parts(kind: i32, bits: i32, tensors: Vec<Tensor>) -> Option<Wire> {
        let mut it = tensors.into_iter();
        let wire = match kind {
            0 => {
                let (hidden, aux, z, gate_penalty) =
                    (it.next()?, it.next()?, it.next()?, it.next()?);
                let depth_sum = if bits & 1 != 0 {
                    Some(it.next()?)
                } else {
                    None
                };
                let layers_used = if bits & 2 != 0 {
                    Some(it.next()?)
                } else {
                    None
                };
                Wire::Carry(ChunkCarry {
                    hidden,
                    aux,
                    z,
                    gate_penalty,
                    depth_sum,
                    layers_used,
                })
            }
            1 => {
                let d_hidden = it.next()?;
                let d_depth = if bits & 1 != 0 {
                    Some(it.next()?)
                } else {
                    None
                };
                Wire::Grad(ChunkCarryGrad { d_hidden, d_depth })
            }
            2 => Wire::Grads(it.by_ref().collect()),
            3 => Wire::Loss,
            _ => return None,
        };
        it.next().is_none().then_some(wire)
    }
}

/// A message that does not decode (a peer running a different layout or build).
#[derive(Debug, thiserror::Error)]
#[error("pipeline message from rank {peer} is malformed: {rule}")]
pub struct WireError {
    /// The sender (pipeline rank).
    pub peer: usize,
    /// What is wrong.
    pub rule: &'static str,
}

fn dtype_code(d: DType) -> i32 {
    match d {
        DType::F32 => 0,
        DType::BF16 => 1,
        DType::I32 => 2,
    }
}

fn code_dtype(c: i32) -> Option<DType> {
    match c {
        0 => Some(DType::F32),
        1 => Some(DType::BF16),
        2 => Some(DType::I32),
        _ => None,
    }
}

/// The executor's [`Transport`] over a pipeline-group [`Communicator`] (pipeline rank =
/// communicator rank). Sends are buffered by the communicator; a receive fails, never
/// hangs, when the peer is gone or silent past the communicator's timeout.
pub struct CommTransport<'c> {
    comm: &'c dyn Communicator,
}

impl<'c> CommTransport<'c> {
    /// A transport over `comm`.
    pub fn new(comm: &'c dyn Communicator) -> CommTransport<'c> {
        CommTransport { comm }
    }

    fn send_i32(&self, v: Vec<i32>, peer: usize) -> Result<(), BoxError> {
        let n = v.len();
        let t = Tensor::from_vec_i32(v, [n], Device::Cpu)?;
        self.comm.send(&t, peer, PIPELINE_TAG)?;
        Ok(())
    }

    fn recv_i32(&self, n: usize, peer: usize) -> Result<Vec<i32>, BoxError> {
        let t = self.comm.recv(peer, PIPELINE_TAG, &[n], DType::I32)?;
        Ok(t.to_host_i32()?)
    }
}

impl Transport<Wire> for CommTransport<'_> {
    fn send(&mut self, peer: usize, wire: Wire) -> Result<(), BoxError> {
        let (kind, bits, tensors) = wire.into_parts();
        // header: kind, bits, count, then per tensor: dtype, rank, dims...
        let mut header = vec![kind, bits, tensors.len() as i32];
        for t in &tensors {
            header.push(dtype_code(t.dtype()));
            header.push(t.dims().len() as i32);
            header.extend(t.dims().iter().map(|&d| d as i32));
        }
        self.send_i32(vec![header.len() as i32], peer)?;
        self.send_i32(header, peer)?;
        for t in &tensors {
            self.comm.send(t, peer, PIPELINE_TAG)?;
        }
        Ok(())
    }

    fn recv(&mut self, peer: usize) -> Result<Wire, BoxError> {
        let bad = |rule| -> BoxError { Box::new(WireError { peer, rule }) };
        let len = self.recv_i32(1, peer)?[0];
        let len = usize::try_from(len).map_err(|_| bad("negative header length"))?;
        let header = self.recv_i32(len, peer)?;
        let (kind, bits, count) = match header.get(..3) {
            Some(&[k, b, c]) => (k, b, c),
            _ => return Err(bad("header shorter than 3 entries")),
        };
        let mut pos = 3;
        let mut tensors = Vec::new();
        for _ in 0..count {
            let (code, rank) = match header.get(pos..pos + 2) {
                Some(&[c, r]) => (c, r),
                _ => return Err(bad("header ends inside a tensor description")),
            };
            let dtype = code_dtype(code).ok_or_else(|| bad("unknown dtype code"))?;
            let rank = usize::try_from(rank).map_err(|_| bad("negative tensor rank"))?;
            let dims: Vec<usize> = header
                .get(pos + 2..pos + 2 + rank)
                .ok_or_else(|| bad("header ends inside a shape"))?
                .iter()
                .map(|&d| usize::try_from(d).map_err(|_| bad("negative dimension")))
                .collect::<Result<_, _>>()?;
            pos += 2 + rank;
            tensors.push(self.comm.recv(peer, PIPELINE_TAG, &dims, dtype)?);
        }
        Wire::from_parts(kind, bits, tensors)
            .ok_or_else(|| bad("unknown kind or wrong tensor count"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use megamoe_comm::ThreadWorld;

    fn t(v: Vec<f32>, dims: &[usize]) -> Tensor {
        Tensor::from_vec_f32(v, dims, Device::Cpu).unwrap()
    }

    #[test]
    fn every_wire_kind_crosses_ranks_unchanged() {
        let out = ThreadWorld::new(2)
            .unwrap()
            .run(|comm| -> Result<Vec<String>, BoxError> {
                let mut tr = CommTransport::new(&comm);
                if comm.rank() == 0 {
                    let carry = ChunkCarry {
                        hidden: t(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3]),
                        aux: Tensor::scalar(0.5, Device::Cpu)?,
                        z: Tensor::scalar(0.25, Device::Cpu)?,
                        gate_penalty: Tensor::scalar(0.0, Device::Cpu)?,
                        depth_sum: None,
                        layers_used: Some(t(vec![3.0, 4.0], &[2])),
                    };
                    tr.send(1, Wire::Carry(carry))?;
                    let grad = ChunkCarryGrad {
                        d_hidden: t(vec![-1.0; 6], &[2, 3]),
                        d_depth: Some(t(vec![0.5, 0.25], &[2])),
                    };
                    tr.send(1, Wire::Grad(grad))?;
                    tr.send(1, Wire::Grads(vec![t(vec![9.0; 8], &[2, 2, 2])]))?;
                    tr.send(1, Wire::Loss)?;
                    return Ok(Vec::new());
                }
                let mut seen = Vec::new();
                for _ in 0..4 {
                    let w = tr.recv(0)?;
                    let text = match &w {
                        Wire::Carry(c) => format!(
                            "{:?} {:?} {:?} {} {:?}",
                            c.hidden.dims(),
                            c.hidden.to_host_f32()?,
                            c.aux.to_host_f32()?,
                            c.depth_sum.is_none(),
                            c.layers_used
                                .as_ref()
                                .map(|u| u.to_host_f32())
                                .transpose()?
                        ),
                        Wire::Grad(g) => format!(
                            "{:?} {:?}",
                            g.d_hidden.to_host_f32()?,
                            g.d_depth.as_ref().map(|d| d.to_host_f32()).transpose()?
                        ),
                        Wire::Grads(v) => format!("{:?}", v[0].dims()),
                        Wire::Loss => "loss".into(),
                    };
                    seen.push(text);
                }
                Ok(seen)
            })
            .unwrap();
        assert_eq!(
            out[1],
            vec![
                "[2, 3] [1.0, 2.0, 3.0, 4.0, 5.0, 6.0] [0.5] true Some([3.0, 4.0])".to_string(),
                "[-1.0, -1.0, -1.0, -1.0, -1.0, -1.0] Some([0.5, 0.25])".into(),
                "[2, 2, 2]".into(),
                "loss".into(),
            ]
        );
    }
}
