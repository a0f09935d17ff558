//! The pipeline executor: runs one rank's program of any generated schedule
//! (GPipe, 1F1B, interleaved, ZB-H1, ZBV, DualPipe, DualPipeV) over
//! [`Stage`]s and a [`Transport`].
//!
//! The executor knows nothing of models: a [`Stage`] is whatever computes
//! one schedule stage's forward, backward-for-input and backward-for-weights
//! per micro-batch (the train crate adapts model chunks to it; the tests use
//! toy linear stages). It walks the rank's program from
//! [`insert_send_recv`](crate::insert_send_recv): F, I, W and B ops call the
//! stage, an `OVERLAP_F_B` unit runs its forward then its backward (no
//! compute overlap on the CPU), SEND/RECV ops move tensors to and from peer
//! ranks in the order of the [`crate::p2p`] contract, and an output whose
//! consumer is on the same rank (the turn of a V) is handed over locally.
//!
//! **Stage contract.** The stage keeps what its backward needs, keyed by
//! micro-batch, until that backward has run (the executor never frees it);
//! a stage's own auxiliary losses (MoE aux, z-loss, ...) enter its own
//! backward; the last stage of a chain computes the loss from its own
//! labels (its forward output is not sent anywhere, and its backward gets no
//! output gradient). After the program, [`sum_shared_gradients`] sums the
//! gradients of parameters held by several stages (DualPipe's mirrored
//! copies, a tied embedding) so every copy holds the same total before the
//! optimizer step.
//!
//! **Timing.** Every action is timed; [`RankTiming`] gives busy (computing)
//! and idle (waiting for peers) time, and [`timing::compare`] sets them next
//! to the simulator's prediction.

pub mod channels;
pub mod timing;

use crate::comm_pass::CommSchedule;
use crate::ir::{Action, Op, OpKind};
use crate::p2p::Payload;
use crate::schedule::Schedule;
use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

pub use channels::{channel_mesh, ChannelTransport};
pub use timing::{compare, measured_costs, RankTiming, TimingRow};

/// Boxed error of a stage or a transport.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// One schedule stage's computation, per micro-batch.
pub trait Stage {
    /// What flows between stages: hidden states and their gradients.
    type Tensor: Send + 'static;

    /// Forward of micro-batch `mb`. `input` is the previous stage's output,
    /// `None` on a chain's first stage (it reads its own batch). On a chain's
    /// last stage the stage computes and keeps the loss; its return value is
    /// not used.
    fn forward(&mut self, mb: usize, input: Option<Self::Tensor>)
        -> Result<Self::Tensor, BoxError>;

    /// Backward for the input of micro-batch `mb`. `grad_output` is the next
    /// stage's input gradient, `None` on a chain's last stage (the loss seeds
    /// it). Returns the gradient of this stage's input (`None` on a chain's
    /// first stage, which has no input to differentiate).
    fn backward_input(
        &mut self,
        mb: usize,
        grad_output: Option<Self::Tensor>,
    ) -> Result<Option<Self::Tensor>, BoxError>;

    /// Backward for the weights of micro-batch `mb` (after its
    /// `backward_input`): accumulates the parameter gradients and frees what
    /// the micro-batch kept.
    fn backward_weight(&mut self, mb: usize) -> Result<(), BoxError>;

    /// The gradient this stage holds for the shared parameters of `group`
    /// (`None`: the stage holds none). All members of a group (see
    /// [`shared_groups`]) must answer alike.
    fn shared_gradient(&mut self, _group: SharedGroup) -> Option<Self::Tensor> {
        None
    }

    /// `total += part`, for summing shared gradients (only called when
    /// [`Stage::shared_gradient`] returns `Some`).
    fn accumulate(&self, _total: &mut Self::Tensor, _part: &Self::Tensor) {}

    /// Replaces this stage's gradient for `group` with the group's sum.
    fn set_shared_gradient(&mut self, _group: SharedGroup, _total: Self::Tensor) {}
}

/// Sends and receives tensors to and from peer pipeline ranks (indices in
/// the pipeline group). `send` must not wait for the matching `recv` (buffer
/// or post it asynchronously); `recv` waits, and must fail — not hang — when
/// the peer is gone. Messages between one ordered pair of ranks arrive in
/// the order they were sent.
pub trait Transport<T> {
    /// Sends `tensor` to pipeline rank `peer`.
    fn send(&mut self, peer: usize, tensor: T) -> Result<(), BoxError>;
    /// Receives the next tensor pipeline rank `peer` sent to this rank.
    fn recv(&mut self, peer: usize) -> Result<T, BoxError>;
}

/// A set of parameters held by more than one schedule stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SharedGroup {
    /// All copies of model stage `n` (DualPipe's two directions).
    ModelStage(usize),
    /// The embedding, used by every chain's first stage and, when tied, by
    /// the head (and MTP) on every chain's last stage.
    Embedding,
}

/// Errors of a pipeline run, naming the rank and the action.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExecError {
    /// The rank's program names a stage the rank was not given.
    #[error("rank {rank}: no stage object for schedule stage {stage} (action {action})")]
    MissingStage {
        /// The rank.
        rank: usize,
        /// The stage.
        stage: usize,
        /// The action that needed it.
        action: String,
    },
    /// An op ran before the tensor it consumes was produced or received.
    #[error("rank {rank}: {action} needs {what}, which is not there (schedule not validated?)")]
    MissingTensor {
        /// The rank.
        rank: usize,
        /// The action.
        action: String,
        /// What it needed.
        what: String,
    },
    /// A stage's forward or backward failed.
    #[error("rank {rank}: stage failed in {action}: {source}")]
    Stage {
        /// The rank.
        rank: usize,
        /// The action.
        action: String,
        /// The stage's error.
        source: BoxError,
    },
    /// Sending to or receiving from a peer failed.
    #[error("rank {rank}: {action} with rank {peer} failed: {source}")]
    Transport {
        /// The rank.
        rank: usize,
        /// The peer.
        peer: usize,
        /// The action (or "shared gradients").
        action: String,
        /// The transport's error.
        source: BoxError,
    },
}

/// Key of a tensor waiting on this rank: (what it is, stage that consumes
/// it, micro-batch).
type Slot = (Payload, usize, usize);

/// Runs `rank`'s program of `comm` (from [`insert_send_recv`](crate::insert_send_recv)
/// or [`validate`](crate::validate) on `schedule`) over `stages` (schedule
/// stage → its stage object; every stage the rank holds) and `transport`.
/// `epoch` is the common time origin of the run's timings.
pub fn run_rank<S, T>(
    schedule: &Schedule,
    comm: &CommSchedule,
    rank: usize,
    stages: &mut BTreeMap<usize, S>,
    transport: &mut T,
    epoch: Instant,
) -> Result<RankTiming, ExecError>
where
    S: Stage,
    T: Transport<S::Tensor>,
{
    let mut waiting: HashMap<Slot, S::Tensor> = HashMap::new();
    let mut timing = RankTiming::new(rank);
    let start = Instant::now();
    for action in comm.programs.get(rank).into_iter().flatten() {
        let t0 = epoch.elapsed().as_secs_f64();
        let mut compute = false;
        for op in action.ops() {
            compute |= op.kind.is_compute();
            run_op(schedule, rank, action, op, stages, transport, &mut waiting)?;
        }
        let t1 = epoch.elapsed().as_secs_f64();
        if compute {
            timing.record(*action, t0, t1);
        }
    }
    timing.wall = start.elapsed().as_secs_f64();
    Ok(timing)
}

fn run_op<S, T>(
    schedule: &Schedule,
    rank: usize,
    action: &Action,
    op: Op,
    stages: &mut BTreeMap<usize, S>,
    transport: &mut T,
    waiting: &mut HashMap<Slot, S::Tensor>,
) -> Result<(), ExecError>
where
    S: Stage,
    T: Transport<S::Tensor>,
{
    let Some(mb) = op.microbatch else {
        return Ok(()); // FSDP / reduce ops are not pipeline work
    };
    let text = || action.to_string();
    let missing = |what: String| ExecError::MissingTensor {
        rank,
        action: text(),
        what,
    };
    let stage_failed = |source| ExecError::Stage {
        rank,
        action: text(),
        source,
    };
    match op.kind {
        OpKind::RecvF | OpKind::RecvB => {
            let m = schedule
                .message(op)
                .ok_or_else(|| missing(format!("a peer for {op}")))?;
            let tensor = transport
                .recv(m.src)
                .map_err(|source| ExecError::Transport {
                    rank,
                    peer: m.src,
                    action: op.to_string(),
                    source,
                })?;
            waiting.insert((m.payload, m.to_stage, mb), tensor);
        }
        OpKind::SendF | OpKind::SendB => {
            let m = schedule
                .message(op)
                .ok_or_else(|| missing(format!("a peer for {op}")))?;
            let tensor = waiting
                .remove(&(m.payload, m.to_stage, mb))
                .ok_or_else(|| missing(format!("the {m}")))?;
            transport
                .send(m.dst, tensor)
                .map_err(|source| ExecError::Transport {
                    rank,
                    peer: m.dst,
                    action: op.to_string(),
                    source,
                })?;
        }
        OpKind::F | OpKind::I | OpKind::B | OpKind::W => {
            let stage = stages
                .get_mut(&op.stage)
                .ok_or_else(|| ExecError::MissingStage {
                    rank,
                    stage: op.stage,
                    action: text(),
                })?;
            match op.kind {
                OpKind::F => {
                    let input = match schedule.prev_stage(op.stage) {
                        Some(_) => Some(
                            waiting
                                .remove(&(Payload::Activation, op.stage, mb))
                                .ok_or_else(|| missing(format!("the input of {op}")))?,
                        ),
                        None => None,
                    };
                    let out = stage.forward(mb, input).map_err(stage_failed)?;
                    if let Some(next) = schedule.next_stage(op.stage) {
                        // Sent by the SEND_F that follows, or used here by `next`.
                        waiting.insert((Payload::Activation, next, mb), out);
                    }
                }
                OpKind::I | OpKind::B => {
                    let grad = match schedule.next_stage(op.stage) {
                        Some(_) => Some(
                            waiting
                                .remove(&(Payload::Gradient, op.stage, mb))
                                .ok_or_else(|| missing(format!("the output gradient of {op}")))?,
                        ),
                        None => None,
                    };
                    let grad_in = stage.backward_input(mb, grad).map_err(stage_failed)?;
                    if op.kind == OpKind::B {
                        stage.backward_weight(mb).map_err(stage_failed)?;
                    }
                    if let (Some(prev), Some(g)) = (schedule.prev_stage(op.stage), grad_in) {
                        waiting.insert((Payload::Gradient, prev, mb), g);
                    }
                }
                _ => stage.backward_weight(mb).map_err(stage_failed)?,
            }
        }
        OpKind::Unshard | OpKind::Reshard | OpKind::ReduceGrad => {}
    }
    Ok(())
}

/// The groups of schedule stages holding the same parameters, each with its
/// members (schedule stages) ascending: every model stage with more than one
/// copy (DualPipe), and the embedding group (every chain's first and last
/// stage) when it has more than one member.
pub fn shared_groups(schedule: &Schedule) -> Vec<(SharedGroup, Vec<usize>)> {
    let map = &schedule.stage_map;
    let mut groups = Vec::new();
    for model_stage in 0..map.model_stages() {
        let copies: Vec<usize> = (0..map.stages())
            .filter(|&s| map.model_stage(s) == Some(model_stage))
            .collect();
        if copies.len() > 1 {
            groups.push((SharedGroup::ModelStage(model_stage), copies));
        }
    }
    let mut ends: Vec<usize> = schedule
        .chains
        .iter()
        .flat_map(|c| c.stages.first().into_iter().chain(c.stages.last()))
        .copied()
        .collect();
    ends.sort_unstable();
    ends.dedup();
    if ends.len() > 1 {
        groups.push((SharedGroup::Embedding, ends));
    }
    groups
}

/// Sums the gradients of shared parameters over each group's members (run
/// on every rank after [`run_rank`], before the optimizer step). Every
/// member ends with the same total, summed in member order — bit-identical
/// on every copy. Groups whose stages answer `None` are skipped.
pub fn sum_shared_gradients<S, T>(
    schedule: &Schedule,
    rank: usize,
    stages: &mut BTreeMap<usize, S>,
    transport: &mut T,
) -> Result<(), ExecError>
where
    S: Stage,
    S::Tensor: Clone,
    T: Transport<S::Tensor>,
{
    let map = &schedule.stage_map;
    for (group, members) in shared_groups(schedule) {
        let mine: Vec<usize> = members
            .iter()
            .copied()
            .filter(|&s| map.rank(s) == Some(rank))
            .collect();
        if mine.is_empty() {
            continue;
        }
        // This rank's parts, by member stage.
        let mut parts: BTreeMap<usize, S::Tensor> = BTreeMap::new();
        for &s in &mine {
            if let Some(g) = stages.get_mut(&s).and_then(|st| st.shared_gradient(group)) {
                parts.insert(s, g);
            }
        }
        if parts.is_empty() {
            continue;
        }
        let fail = |peer, source| ExecError::Transport {
            rank,
            peer,
            action: format!("shared gradients {group:?}"),
            source,
        };
        // Send each own part to every other rank of the group, then receive theirs.
        let mut peers: Vec<usize> = members.iter().filter_map(|&s| map.rank(s)).collect();
        peers.sort_unstable();
        peers.dedup();
        peers.retain(|&p| p != rank);
        for &peer in &peers {
            for part in parts.values() {
                transport
                    .send(peer, part.clone())
                    .map_err(|e| fail(peer, e))?;
            }
        }
        for &s in &members {
            let Some(peer) = map.rank(s).filter(|&p| p != rank) else {
                continue;
            };
            let g = transport.recv(peer).map_err(|e| fail(peer, e))?;
            parts.insert(s, g);
        }
        let Some(&first) = mine.first() else { continue };
        let Some(stage) = stages.get(&first) else {
            continue;
        };
        let mut iter = parts.into_values();
        let Some(mut total) = iter.next() else {
            continue;
        };
        for part in iter {
            stage.accumulate(&mut total, &part);
        }
        for &s in &mine {
            if let Some(st) = stages.get_mut(&s) {
                st.set_shared_gradient(group, total.clone());
            }
        }
    }
    Ok(())
}
