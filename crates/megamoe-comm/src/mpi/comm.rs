//! [`MpiComm`]: the [`Communicator`] of one MPI process.
//!
//! Every collective is built from non-blocking point-to-point messages (see `engine`), so
//! it can be started and waited later, polled against a deadline, and combined with the
//! same rank-order steps as thread ranks ([`crate::reduce`]): identical bits.
//! - all_reduce: the elements are cut into `size` chunks; rank `j` receives chunk `j` from
//!   every rank, reduces it in rank order, and sends the result to every rank (the
//!   reduction is elementwise, so this equals reducing whole tensors in rank order);
//! - all_gather, all_to_all_v, broadcast, barrier: direct messages to each peer;
//! - reduce_scatter: rank `j` receives block `j` from every rank and reduces in rank order;
//! - split: the ranks exchange their groups (checked like thread ranks), then
//!   `MPI_Comm_split`.
//!
//! Collective messages travel on one duplicated MPI communicator with tags `2·seq` and
//! `2·seq + 1` (seq = the collective's number modulo 16384; MPI keeps messages with one tag
//! in order), `send` / `recv` on another with the caller's tag, so they never mix.

use std::os::raw::c_int;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use megamoe_tensor::{DType, Tensor};

use super::engine::{self, Expect, Peers, RawComm, Runtime};
use super::wire::{
    check_layout, check_op, decode, encode, op_code, tensor_bytes, tensor_from_bytes, Message,
};
use crate::communicator::{check_counts, check_peer, Communicator, Pending, ReduceOp};
use crate::error::{CommError, Result};
use crate::local::check_group;
use crate::reduce::{check_rows_sum, leading_rows, reduce_in_rank_order, row_block};

/// Collective numbers wrap here (two tags each; MPI guarantees tags up to 32767).
const SEQ_SPACE: u64 = 16384;

/// One MPI process's handle on a communicator (the world, or a group split from it).
/// Built by [`MpiWorld::communicator`](super::MpiWorld::communicator) and
/// [`Communicator::split`].
pub struct MpiComm {
    ctx: Ctx,
    /// Point-to-point messages (`send` / `recv`).
    p2p: RawComm,
    seq: AtomicU64,
}

impl std::fmt::Debug for MpiComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MpiComm")
            .field("rank", &self.ctx.rank)
            .field("members", &self.ctx.members)
            .finish()
    }
}

/// What a collective in flight needs (cloned into its [`Pending`]).
#[derive(Clone)]
struct Ctx {
    rt: Arc<Runtime>,
    /// Collective messages.
    comm: RawComm,
    members: Arc<[usize]>,
    rank: usize,
    timeout: Duration,
}

impl Ctx {
    /// This rank's world rank.
    fn me(&self) -> usize {
        self.members[self.rank]
    }

    fn size(&self) -> usize {
        self.members.len()
    }

    /// The other ranks of the communicator.
    fn others(&self) -> Vec<usize> {
        (0..self.size()).filter(|&r| r != self.rank).collect()
    }

    /// Starts the sends `(destination, tag, bytes)` on `comm`.
    fn post(&self, comm: RawComm, sends: Vec<(usize, c_int, Vec<u8>)>) -> Result<()> {
        let mut st = self.rt.lock()?;
        for (dst, tag, buf) in sends {
            self.rt
                .isend(&mut st, comm, dst, self.members[dst], tag, buf)?;
        }
        Ok(())
    }

    /// Receives one message from each of `srcs` with `tag` on `comm`, decoded.
    fn recv(
        &self,
        comm: RawComm,
        op: &'static str,
        srcs: &[usize],
        tag: c_int,
    ) -> Result<Vec<Message>> {
        let mut expects: Vec<Expect> = srcs.iter().map(|&s| Expect::new(s, tag)).collect();
        let peers = Peers {
            comm,
            members: &self.members,
            timeout: self.timeout,
        };
        self.rt.wait(&peers, op, &mut expects)?;
        expects
            .iter_mut()
            .map(|e| decode(self.me(), self.members[e.src], op, e.take()))
            .collect()
    }

    /// Receives the collective `op` number `seq` from every other rank (`phase` 0 or 1),
    /// indexed by communicator rank (`None` at this rank).
    fn gather(&self, op: &'static str, seq: u64, phase: u64) -> Result<Vec<Option<Message>>> {
        let others = self.others();
        let msgs = self.recv(self.comm, op, &others, tag(seq, phase))?;
        let mut out: Vec<Option<Message>> = (0..self.size()).map(|_| None).collect();
        for (src, m) in others.into_iter().zip(msgs) {
            check_op(self.me(), self.members[src], seq, op, &m)?;
            out[src] = Some(m);
        }
        Ok(out)
    }

    /// Sends the same bytes to every other rank.
    fn to_all(&self, seq: u64, phase: u64, bytes: &[u8]) -> Result<()> {
        let sends = self
            .others()
            .into_iter()
            .map(|r| (r, tag(seq, phase), bytes.to_vec()))
            .collect();
        self.post(self.comm, sends)
    }

    /// Checks every rank passed the same `meta` (`what` names it).
    fn check_meta(
        &self,
        op: &'static str,
        what: &str,
        mine: &[usize],
        msgs: &[Option<Message>],
    ) -> Result<()> {
        for (r, m) in msgs.iter().enumerate() {
            if let Some(m) = m {
                if m.meta != mine {
                    return Err(CommError::Mismatch {
                        rank: self.me(),
                        op,
                        detail: format!(
                            "this rank passed {what} {mine:?} but rank {} passed {:?}",
                            self.members[r], m.meta
                        ),
                    });
                }
            }
        }
        Ok(())
    }
}

/// The tag of phase `phase` (0 or 1) of collective `seq`.
fn tag(seq: u64, phase: u64) -> c_int {
    ((seq % SEQ_SPACE) * 2 + phase) as c_int
}

fn reduce_op_code(op: ReduceOp) -> usize {
    match op {
        ReduceOp::Sum => 0,
        ReduceOp::Mean => 1,
        ReduceOp::Max => 2,
    }
}

/// Element range of chunk `j` of `n` over `numel` elements.
fn chunk(numel: usize, n: usize, j: usize) -> std::ops::Range<usize> {
    (j * numel / n)..((j + 1) * numel / n)
}

impl MpiComm {
    pub(crate) fn new(
        rt: Arc<Runtime>,
        coll: RawComm,
        p2p: RawComm,
        rank: usize,
        members: Vec<usize>,
        timeout: Duration,
    ) -> MpiComm {
        MpiComm {
            ctx: Ctx {
                rt,
                comm: coll,
                members: members.into(),
                rank,
                timeout,
            },
            p2p,
            seq: AtomicU64::new(0),
        }
    }

    /// Sets how long this communicator's calls wait for the other ranks before
    /// [`CommError::Timeout`] (sub-communicators split later inherit it).
    pub fn with_timeout(mut self, timeout: Duration) -> MpiComm {
        self.ctx.timeout = timeout;
        self
    }

    /// How long a call waits for the other ranks before [`CommError::Timeout`].
    pub fn timeout(&self) -> Duration {
        self.ctx.timeout
    }

    fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed)
    }
}

/// The float-only rule of reductions, checked before any message leaves.
fn check_float(op: &'static str, x: &Tensor) -> Result<()> {
    if x.dtype().is_float() {
        return Ok(());
    }
    Err(CommError::InvalidArgument {
        op,
        arg: "dtype",
        value: x.dtype().to_string(),
        rule: "reductions need a float tensor (f32 or bf16)",
    })
}

impl Communicator for MpiComm {
    fn rank(&self) -> usize {
        self.ctx.rank
    }

    fn size(&self) -> usize {
        self.ctx.size()
    }

    fn members(&self) -> &[usize] {
        &self.ctx.members
    }

    fn start_all_reduce(&self, x: &Tensor, op: ReduceOp) -> Result<Pending> {
        const OP: &str = "all_reduce";
        check_float(OP, x)?;
        let ctx = self.ctx.clone();
        let (n, rank, seq) = (ctx.size(), ctx.rank, self.next_seq());
        let (dtype, dims, device) = (x.dtype(), x.dims().to_vec(), x.device());
        let esz = dtype.size_in_bytes();
        let numel = x.numel();
        let bytes = tensor_bytes(x)?;
        let mut meta = vec![reduce_op_code(op)];
        meta.extend_from_slice(&dims);
        let code = op_code(OP);
        let sends = ctx
            .others()
            .into_iter()
            .map(|j| {
                let c = chunk(numel, n, j);
                let payload = &bytes[c.start * esz..c.end * esz];
                (
                    j,
                    tag(seq, 0),
                    encode(code, Some((dtype, &[c.len()], payload)), &meta),
                )
            })
            .collect();
        ctx.post(ctx.comm, sends)?;
        Ok(Pending::deferred(move || {
            let me = ctx.me();
            let mine = chunk(numel, n, rank);
            let msgs = ctx.gather(OP, seq, 0)?;
            ctx.check_meta(OP, "(reduce op, shape)", &meta, &msgs)?;
            let reduced = if mine.is_empty() {
                Vec::new()
            } else {
                let parts = msgs
                    .iter()
                    .enumerate()
                    .map(|(src, m)| match m {
                        Some(m) => {
                            check_layout(me, ctx.members[src], OP, m, &[mine.len()], dtype)?;
                            tensor_from_bytes(&m.payload, dtype, &[mine.len()], device)
                        }
                        None => tensor_from_bytes(
                            &bytes[mine.start * esz..mine.end * esz],
                            dtype,
                            &[mine.len()],
                            device,
                        ),
                    })
                    .collect::<Result<Vec<_>>>()?;
                tensor_bytes(&reduce_in_rank_order(&parts, op)?)?
            };
            ctx.to_all(
                seq,
                1,
                &encode(code, Some((dtype, &[mine.len()], &reduced)), &meta),
            )?;
            let results = ctx.gather(OP, seq, 1)?;
            let mut out = Vec::with_capacity(numel * esz);
            for (j, m) in results.iter().enumerate() {
                match m {
                    Some(m) => {
                        let want = chunk(numel, n, j).len();
                        check_layout(me, ctx.members[j], OP, m, &[want], dtype)?;
                        out.extend_from_slice(&m.payload);
                    }
                    None => out.extend_from_slice(&reduced),
                }
            }
            tensor_from_bytes(&out, dtype, &dims, device)
        }))
    }

    fn start_all_gather(&self, x: &Tensor) -> Result<Pending> {
        const OP: &str = "all_gather";
        let rows = leading_rows(OP, x)?;
        let ctx = self.ctx.clone();
        let seq = self.next_seq();
        let (dtype, dims, device) = (x.dtype(), x.dims().to_vec(), x.device());
        let bytes = tensor_bytes(x)?;
        ctx.to_all(
            seq,
            0,
            &encode(op_code(OP), Some((dtype, &dims, &bytes)), &[]),
        )?;
        Ok(Pending::deferred(move || {
            let msgs = ctx.gather(OP, seq, 0)?;
            let mut out = Vec::with_capacity(bytes.len() * ctx.size());
            for (src, m) in msgs.iter().enumerate() {
                match m {
                    Some(m) => {
                        check_layout(ctx.me(), ctx.members[src], OP, m, &dims, dtype)?;
                        out.extend_from_slice(&m.payload);
                    }
                    None => out.extend_from_slice(&bytes),
                }
            }
            let mut full = dims.clone();
            full[0] = rows * ctx.size();
            tensor_from_bytes(&out, dtype, &full, device)
        }))
    }

    fn start_reduce_scatter(&self, x: &Tensor, op: ReduceOp) -> Result<Pending> {
        const OP: &str = "reduce_scatter";
        check_float(OP, x)?;
        let ctx = self.ctx.clone();
        let (n, rank) = (ctx.size(), ctx.rank);
        let own = row_block(x, n, rank)?; // checks dim 0 before sending
        let seq = self.next_seq();
        let (dtype, dims, device) = (x.dtype(), x.dims().to_vec(), x.device());
        let block_bytes = own.numel() * dtype.size_in_bytes();
        let bytes = tensor_bytes(x)?;
        let block_dims = own.dims().to_vec();
        let mut meta = vec![reduce_op_code(op)];
        meta.extend_from_slice(&dims);
        let code = op_code(OP);
        let sends = ctx
            .others()
            .into_iter()
            .map(|j| {
                let payload = &bytes[j * block_bytes..(j + 1) * block_bytes];
                (
                    j,
                    tag(seq, 0),
                    encode(code, Some((dtype, &block_dims, payload)), &meta),
                )
            })
            .collect();
        ctx.post(ctx.comm, sends)?;
        Ok(Pending::deferred(move || {
            let msgs = ctx.gather(OP, seq, 0)?;
            ctx.check_meta(OP, "(reduce op, shape)", &meta, &msgs)?;
            let parts = msgs
                .iter()
                .enumerate()
                .map(|(src, m)| match m {
                    Some(m) => {
                        check_layout(ctx.me(), ctx.members[src], OP, m, &block_dims, dtype)?;
                        tensor_from_bytes(&m.payload, dtype, &block_dims, device)
                    }
                    None => Ok(own.clone()),
                })
                .collect::<Result<Vec<_>>>()?;
            reduce_in_rank_order(&parts, op)
        }))
    }

    fn start_all_to_all_v(
        &self,
        x: &Tensor,
        send_rows: &[usize],
        recv_rows: &[usize],
    ) -> Result<Pending> {
        const OP: &str = "all_to_all_v";
        let ctx = self.ctx.clone();
        let (n, rank) = (ctx.size(), ctx.rank);
        check_counts(OP, "send_rows", send_rows, n)?;
        check_counts(OP, "recv_rows", recv_rows, n)?;
        check_rows_sum(OP, x, send_rows)?;
        let seq = self.next_seq();
        let (dtype, device) = (x.dtype(), x.device());
        let rest = x.dims()[1..].to_vec();
        let row_bytes = rest.iter().product::<usize>() * dtype.size_in_bytes();
        let bytes = tensor_bytes(x)?;
        let offset = |j: usize| send_rows[..j].iter().sum::<usize>() * row_bytes;
        let code = op_code(OP);
        let sends = ctx
            .others()
            .into_iter()
            .map(|j| {
                let payload = &bytes[offset(j)..offset(j) + send_rows[j] * row_bytes];
                let mut d = vec![send_rows[j]];
                d.extend_from_slice(&rest);
                (
                    j,
                    tag(seq, 0),
                    encode(code, Some((dtype, &d, payload)), &[]),
                )
            })
            .collect();
        ctx.post(ctx.comm, sends)?;
        let own = bytes[offset(rank)..offset(rank) + send_rows[rank] * row_bytes].to_vec();
        let own_rows = send_rows[rank];
        let recv_rows = recv_rows.to_vec();
        Ok(Pending::deferred(move || {
            let me = ctx.me();
            let msgs = ctx.gather(OP, seq, 0)?;
            let mut out = Vec::with_capacity(recv_rows.iter().sum::<usize>() * row_bytes);
            for (src, m) in msgs.iter().enumerate() {
                let (sent, theirs): (usize, &[usize]) = match m {
                    Some(m) => (
                        m.dims.first().copied().unwrap_or(0),
                        &m.dims[1.min(m.dims.len())..],
                    ),
                    None => (own_rows, &rest),
                };
                if sent != recv_rows[src] {
                    return Err(CommError::Mismatch {
                        rank: me,
                        op: OP,
                        detail: format!(
                            "expected recv_rows[{src}]={} rows but that rank sends {sent}",
                            recv_rows[src]
                        ),
                    });
                }
                match m {
                    Some(m) => {
                        if theirs != rest || m.dtype != Some(dtype) {
                            return Err(CommError::Mismatch {
                                rank: me,
                                op: OP,
                                detail: format!(
                                    "row shape {rest:?} {dtype} here but rank {} sends {theirs:?} {}",
                                    ctx.members[src],
                                    m.dtype.map_or("no tensor".into(), |d| d.to_string())
                                ),
                            });
                        }
                        out.extend_from_slice(&m.payload);
                    }
                    None => out.extend_from_slice(&own),
                }
            }
            let mut dims = vec![recv_rows.iter().sum::<usize>()];
            dims.extend_from_slice(&rest);
            tensor_from_bytes(&out, dtype, &dims, device)
        }))
    }

    fn start_broadcast(&self, x: &Tensor, root: usize) -> Result<Pending> {
        const OP: &str = "broadcast";
        check_peer(OP, "root", root, self.size())?;
        let ctx = self.ctx.clone();
        let seq = self.next_seq();
        let (dtype, dims, device) = (x.dtype(), x.dims().to_vec(), x.device());
        if ctx.rank == root {
            let bytes = tensor_bytes(x)?;
            ctx.to_all(
                seq,
                0,
                &encode(op_code(OP), Some((dtype, &dims, &bytes)), &[root]),
            )?;
            return Ok(Pending::ready(x.clone()));
        }
        Ok(Pending::deferred(move || {
            let m = ctx.recv(ctx.comm, OP, &[root], tag(seq, 0))?;
            let m = &m[0];
            let from = ctx.members[root];
            check_op(ctx.me(), from, seq, OP, m)?;
            if m.meta != [root] {
                return Err(CommError::Mismatch {
                    rank: ctx.me(),
                    op: OP,
                    detail: format!(
                        "this rank passed root {root} but rank {from} passed {:?}",
                        m.meta
                    ),
                });
            }
            check_layout(ctx.me(), from, OP, m, &dims, dtype)?;
            tensor_from_bytes(&m.payload, dtype, &dims, device)
        }))
    }

    fn send(&self, x: &Tensor, dst: usize, tag: u32) -> Result<()> {
        const OP: &str = "send";
        check_peer(OP, "dst", dst, self.size())?;
        if tag > self.ctx.rt.tag_ub {
            return Err(CommError::InvalidArgument {
                op: OP,
                arg: "tag",
                value: tag.to_string(),
                rule: "must be at most this MPI's MPI_TAG_UB",
            });
        }
        let bytes = tensor_bytes(x)?;
        let msg = encode(op_code(OP), Some((x.dtype(), x.dims(), &bytes)), &[]);
        self.ctx.post(self.p2p, vec![(dst, tag as c_int, msg)])
    }

    fn start_recv(&self, src: usize, tag: u32, shape: &[usize], dtype: DType) -> Result<Pending> {
        const OP: &str = "recv";
        check_peer(OP, "src", src, self.size())?;
        if tag > self.ctx.rt.tag_ub {
            return Err(CommError::InvalidArgument {
                op: OP,
                arg: "tag",
                value: tag.to_string(),
                rule: "must be at most this MPI's MPI_TAG_UB",
            });
        }
        let (ctx, p2p, shape) = (self.ctx.clone(), self.p2p, shape.to_vec());
        Ok(Pending::deferred(move || {
            let m = ctx.recv(p2p, OP, &[src], tag as c_int)?;
            let m = &m[0];
            if m.dtype != Some(dtype) || m.dims != shape {
                return Err(CommError::Mismatch {
                    rank: ctx.me(),
                    op: OP,
                    detail: format!(
                        "expected {shape:?} {dtype} from rank {} tag {tag} but got {:?} {}",
                        ctx.members[src],
                        m.dims,
                        m.dtype.map_or("no tensor".into(), |d| d.to_string())
                    ),
                });
            }
            tensor_from_bytes(&m.payload, dtype, &shape, megamoe_tensor::Device::Cpu)
        }))
    }

    fn barrier(&self) -> Result<()> {
        const OP: &str = "barrier";
        let seq = self.next_seq();
        self.ctx.to_all(seq, 0, &encode(op_code(OP), None, &[]))?;
        self.ctx.gather(OP, seq, 0).map(|_| ())
    }

    fn split(&self, group: &[usize]) -> Result<Box<dyn Communicator>> {
        const OP: &str = "split";
        let ctx = &self.ctx;
        check_group(ctx.me(), ctx.rank, ctx.size(), group)?;
        let seq = self.next_seq();
        ctx.to_all(seq, 0, &encode(op_code(OP), None, group))?;
        let msgs = ctx.gather(OP, seq, 0)?;
        let groups: Vec<&[usize]> = msgs
            .iter()
            .map(|m| m.as_ref().map_or(group, |m| &m.meta[..]))
            .collect();
        for g in &groups {
            for &m in g.iter() {
                if groups.get(m) != Some(g) {
                    return Err(CommError::Mismatch {
                        rank: ctx.me(),
                        op: OP,
                        detail: format!(
                            "a member of group {g:?} passed group {:?}; every member of a \
                             group must pass the same list",
                            groups.get(m)
                        ),
                    });
                }
            }
        }
        // Every rank has joined (the exchange above completed), so the blocking MPI calls
        // below meet all of them.
        let color = group.iter().copied().min().unwrap_or(0);
        let key = group.iter().position(|&r| r == ctx.rank).unwrap_or(0);
        let (coll, p2p) = {
            let _st = ctx.rt.lock()?;
            let coll = engine::split(ctx.me(), ctx.comm, color, key)?;
            let p2p = engine::dup(ctx.me(), coll)?;
            (coll, p2p)
        };
        let members = group.iter().map(|&r| ctx.members[r]).collect();
        Ok(Box::new(MpiComm::new(
            ctx.rt.clone(),
            coll,
            p2p,
            key,
            members,
            ctx.timeout,
        )))
    }
}

// A compile-time check that the engine's handle is what the trait needs.
const _: fn() = || {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<MpiComm>();
};
