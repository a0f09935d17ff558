//! Thread ranks: a world of `n` ranks as `n` threads of one process ([`ThreadWorld::run`]),
//! each holding a [`ThreadComm`]. The default engine and what `cargo test` uses.
//!
//! How it works: each communicator owns a [`Board`]. A collective is numbered by a per-rank
//! sequence counter (ranks issue collectives in the same order); `start_*` posts this rank's
//! tensor (an `Arc` handle, no copy; a view of a write-through buffer — a flat gradient
//! bucket — is copied, see [`posted`]) into the board's slot for that number and returns at once;
//! `wait` blocks until every member has posted, then computes the result from all parts with
//! the shared combine steps in [`crate::reduce`] (rank order, so every rank gets the same
//! bits). Point-to-point messages are FIFO mailboxes keyed by (source, destination, tag);
//! `send` never blocks.
//!
//! Failures: when a rank's closure returns an error or panics, the world records it; every
//! wait checks that record (at least every 100 ms) and returns [`CommError::PeerFailed`] naming
//! the rank. A rank that never joins makes the others return [`CommError::Timeout`] naming it
//! after the world's timeout (default [`DEFAULT_TIMEOUT`]).

use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use megamoe_tensor::{DType, Tensor};

use crate::communicator::{check_counts, check_peer, Communicator, Pending, ReduceOp};
use crate::error::{CommError, Result};
use crate::reduce::{
    cat_rows, check_rows_sum, check_same_layout, leading_rows, reduce_in_rank_order, row_block,
    rows_for,
};

/// How long a thread rank waits for the others before [`CommError::Timeout`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(45);

/// Longest sleep between checks for a failed rank.
const POLL: Duration = Duration::from_millis(100);

/// A world of thread ranks.
#[derive(Debug, Clone)]
pub struct ThreadWorld {
    size: usize,
    timeout: Duration,
}

/// The ranks of a [`ThreadWorld::run`] that failed, each with its message (sorted by rank);
/// `first` is the rank whose failure came first (the cause; the others usually report it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} of {world} ranks failed; first rank {}: {}", failures.len(), first.0, first.1)]
pub struct RankFailures {
    /// World size.
    pub world: usize,
    /// The first failure recorded: (rank, message).
    pub first: (usize, String),
    /// Every failed rank with its message, by rank.
    pub failures: Vec<(usize, String)>,
}

impl ThreadWorld {
    /// A world of `size` ranks (≥ 1) with the default timeout.
    pub fn new(size: usize) -> Result<ThreadWorld> {
        if size == 0 {
            return Err(CommError::InvalidArgument {
                op: "ThreadWorld::new",
                arg: "size",
                value: "0".into(),
                rule: "a world needs at least one rank",
            });
        }
        Ok(ThreadWorld {
            size,
            timeout: DEFAULT_TIMEOUT,
        })
    }

    /// Sets how long a rank waits for the others before giving up.
    pub fn with_timeout(mut self, timeout: Duration) -> ThreadWorld {
        self.timeout = timeout;
        self
    }

    /// Number of ranks.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Runs `f` on every rank (one thread each) and returns the results by rank, or every
    /// rank's failure. A rank that returns `Err` or panics is recorded as failed, which makes
    /// the other ranks' pending and later communicator calls fail with
    /// [`CommError::PeerFailed`] naming it, so the whole world stops.
    pub fn run<T, E, F>(&self, f: F) -> Result<Vec<T>, RankFailures>
    where
        T: Send,
        E: std::fmt::Display,
        F: Fn(ThreadComm) -> Result<T, E> + Sync,
    {
        let world = Arc::new(World {
            timeout: self.timeout,
            failure: Mutex::new(None),
            splits: Mutex::new(HashMap::new()),
            next_board: AtomicU64::new(1),
        });
        let root = Board::new(0, (0..self.size).collect(), world.clone());
        let outcomes: Vec<Result<T, String>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..self.size)
                .map(|r| {
                    let (world, root, f) = (world.clone(), root.clone(), &f);
                    std::thread::Builder::new()
                        .name(format!("rank-{r}"))
                        .spawn_scoped(s, move || {
                            let comm = ThreadComm::new(root, r);
                            let out = std::panic::catch_unwind(AssertUnwindSafe(|| f(comm)));
                            let msg = match out {
                                Ok(Ok(v)) => return Ok(v),
                                Ok(Err(e)) => e.to_string(),
                                Err(p) => format!("panicked: {}", panic_message(&*p)),
                            };
                            world.fail(r, &msg);
                            Err(msg)
                        })
                })
                .collect();
            handles
                .into_iter()
                .enumerate()
                .map(|(r, h)| match h {
                    Ok(h) => h
                        .join()
                        .unwrap_or_else(|p| Err(format!("panicked: {}", panic_message(&*p)))),
                    Err(e) => {
                        let msg = format!("could not start thread: {e}");
                        world.fail(r, &msg);
                        Err(msg)
                    }
                })
                .collect()
        });
        let mut values = Vec::with_capacity(self.size);
        let mut failures = Vec::new();
        for (r, o) in outcomes.into_iter().enumerate() {
            match o {
                Ok(v) => values.push(v),
                Err(m) => failures.push((r, m)),
            }
        }
        if failures.is_empty() {
            return Ok(values);
        }
        let first = world.failure().unwrap_or_else(|| failures[0].clone());
        Err(RankFailures {
            world: self.size,
            first,
            failures,
        })
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".into()
    }
}

/// State shared by every rank of one world.
struct World {
    timeout: Duration,
    /// The first rank that failed, with its message.
    failure: Mutex<Option<(usize, String)>>,
    /// Sub-communicator boards being built: (parent board, split number, world members) →
    /// (board, members still to pick it up).
    splits: Mutex<HashMap<SplitKey, (Arc<Board>, usize)>>,
    next_board: AtomicU64,
}

type SplitKey = (u64, u64, Vec<usize>);

impl World {
    fn fail(&self, rank: usize, msg: &str) {
        let mut f = lock(&self.failure);
        if f.is_none() {
            *f = Some((rank, msg.to_string()));
        }
    }

    fn failure(&self) -> Option<(usize, String)> {
        lock(&self.failure).clone()
    }
}

/// Locks a mutex, ignoring poisoning (a panicking rank is reported through `World::fail`;
/// the board state itself stays consistent because no code panics while holding it).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One rank's contribution to a collective.
#[derive(Clone)]
struct Part {
    op: &'static str,
    tensor: Option<Tensor>,
    /// Op-specific numbers (send counts, root, reduce op, split group) checked across ranks.
    meta: Vec<usize>,
}

struct Slot {
    parts: Vec<Option<Part>>,
    readers_left: usize,
}

#[derive(Default)]
struct BoardState {
    slots: HashMap<u64, Slot>,
    mail: HashMap<(usize, usize, u32), VecDeque<Tensor>>,
}

/// The rendezvous of one communicator.
struct Board {
    id: u64,
    /// World ranks by communicator rank.
    members: Vec<usize>,
    world: Arc<World>,
    state: Mutex<BoardState>,
    cv: Condvar,
}

impl Board {
    fn new(id: u64, members: Vec<usize>, world: Arc<World>) -> Arc<Board> {
        Arc::new(Board {
            id,
            members,
            world,
            state: Mutex::new(BoardState::default()),
            cv: Condvar::new(),
        })
    }

    /// Waits until `ready` yields a value; fails on a recorded rank failure or the timeout
    /// (`missing` lists the communicator ranks still awaited).
    fn wait_for<R>(
        &self,
        rank: usize,
        op: &'static str,
        mut ready: impl FnMut(&mut BoardState) -> Option<R>,
        missing: impl Fn(&BoardState) -> Vec<usize>,
    ) -> Result<R> {
        let start = Instant::now();
        let mut st = lock(&self.state);
        loop {
            if let Some(r) = ready(&mut st) {
                return Ok(r);
            }
            let world_rank = self.members[rank];
            if let Some((failed_rank, reason)) = self.world.failure() {
                return Err(CommError::PeerFailed {
                    rank: world_rank,
                    op,
                    failed_rank,
                    reason,
                });
            }
            let waited = start.elapsed();
            if waited >= self.world.timeout {
                let missing = missing(&st).into_iter().map(|r| self.members[r]).collect();
                return Err(CommError::Timeout {
                    rank: world_rank,
                    op,
                    waited,
                    missing,
                });
            }
            let slice = POLL.min(self.world.timeout - waited);
            st = self
                .cv
                .wait_timeout(st, slice)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Posts `part` as `rank`'s contribution to collective `seq`.
    fn post(&self, seq: u64, rank: usize, part: Part) {
        let n = self.members.len();
        let mut st = lock(&self.state);
        let slot = st.slots.entry(seq).or_insert_with(|| Slot {
            parts: vec![None; n],
            readers_left: n,
        });
        slot.parts[rank] = Some(part);
        drop(st);
        self.cv.notify_all();
    }

    /// Waits for every part of collective `seq`; checks they are the same collective.
    fn collect(&self, seq: u64, rank: usize, op: &'static str) -> Result<Vec<Part>> {
        let parts = self.wait_for(
            rank,
            op,
            |st| {
                let slot = st.slots.get_mut(&seq)?;
                if slot.parts.iter().any(Option::is_none) {
                    return None;
                }
                let parts: Vec<Part> = slot.parts.iter().flatten().cloned().collect();
                slot.readers_left -= 1;
                if slot.readers_left == 0 {
                    st.slots.remove(&seq);
                }
                Some(parts)
            },
            |st| match st.slots.get(&seq) {
                Some(slot) => (0..slot.parts.len())
                    .filter(|&r| slot.parts[r].is_none())
                    .collect(),
                None => (0..self.members.len()).filter(|&r| r != rank).collect(),
            },
        )?;
        for (r, p) in parts.iter().enumerate() {
            if p.op != op {
                return Err(CommError::Mismatch {
                    rank: self.members[rank],
                    op,
                    detail: format!(
                        "collective #{seq}: this rank called {op} but rank {} called {}",
                        self.members[r], p.op
                    ),
                });
            }
        }
        Ok(parts)
    }
}

/// One thread rank's handle on a communicator (the world, or a group split from it).
pub struct ThreadComm {
    board: Arc<Board>,
    rank: usize,
    seq: AtomicU64,
    splits: AtomicU64,
}

impl std::fmt::Debug for ThreadComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadComm")
            .field("rank", &self.rank)
            .field("members", &self.board.members)
            .finish()
    }
}

impl ThreadComm {
    fn new(board: Arc<Board>, rank: usize) -> ThreadComm {
        ThreadComm {
            board,
            rank,
            seq: AtomicU64::new(0),
            splits: AtomicU64::new(0),
        }
    }

    /// Posts a part and returns a handle that waits for the others and runs `finish` on all
    /// parts (indexed by communicator rank).
    fn collective(
        &self,
        op: &'static str,
        tensor: Option<Tensor>,
        meta: Vec<usize>,
        finish: impl FnOnce(usize, Vec<Part>) -> Result<Tensor> + Send + 'static,
    ) -> Pending {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        self.board.post(seq, self.rank, Part { op, tensor, meta });
        let (board, rank) = (self.board.clone(), self.rank);
        Pending::deferred(move || {
            let parts = board.collect(seq, rank, op)?;
            finish(board.members[rank], parts)
        })
    }
}

/// The handle this rank posts for `x`: `x` itself (tensors are immutable, sharing is free),
/// but a private copy of a write-through view ([`Tensor::is_write_through`]): other ranks
/// read the posted tensor after this rank's `wait` may have returned, and its owner writes
/// the result back into that very view (the flat gradient buffer's bucket all-reduce). The
/// copy is what an in-process transport has for a send buffer; MPI and NCCL read the view.
fn posted(x: &Tensor) -> Result<Tensor> {
    if x.is_write_through() {
        Ok(x.deep_copy()?)
    } else {
        Ok(x.clone())
    }
}

/// The tensors of `parts` (every part of a tensor collective has one).
fn tensors(parts: &[Part]) -> Vec<Tensor> {
    parts.iter().filter_map(|p| p.tensor.clone()).collect()
}

/// Checks every rank passed the same `meta` (reduce op, root, ...), `what` naming it.
fn check_same_meta(world_rank: usize, op: &'static str, what: &str, parts: &[Part]) -> Result<()> {
    for (r, p) in parts.iter().enumerate() {
        if p.meta != parts[0].meta {
            return Err(CommError::Mismatch {
                rank: world_rank,
                op,
                detail: format!(
                    "rank 0 passed {what} {:?} but rank {r} passed {:?}",
                    parts[0].meta, p.meta
                ),
            });
        }
    }
    Ok(())
}

fn reduce_op_code(op: ReduceOp) -> usize {
    match op {
        ReduceOp::Sum => 0,
        ReduceOp::Mean => 1,
        ReduceOp::Max => 2,
    }
}

impl Communicator for ThreadComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.board.members.len()
    }

    fn members(&self) -> &[usize] {
        &self.board.members
    }

    fn start_all_reduce(&self, x: &Tensor, op: ReduceOp) -> Result<Pending> {
        const OP: &str = "all_reduce";
        let meta = vec![reduce_op_code(op)];
        Ok(
            self.collective(OP, Some(posted(x)?), meta, move |me, parts| {
                check_same_meta(me, OP, "reduce op", &parts)?;
                let ts = tensors(&parts);
                check_same_layout(me, OP, &ts)?;
                reduce_in_rank_order(&ts, op)
            }),
        )
    }

    fn start_all_gather(&self, x: &Tensor) -> Result<Pending> {
        const OP: &str = "all_gather";
        leading_rows(OP, x)?;
        let (rest, dtype) = (x.dims()[1..].to_vec(), x.dtype());
        Ok(
            self.collective(OP, Some(posted(x)?), vec![], move |me, parts| {
                let ts = tensors(&parts);
                check_same_layout(me, OP, &ts)?;
                cat_rows(&ts, &rest, dtype)
            }),
        )
    }

    fn start_reduce_scatter(&self, x: &Tensor, op: ReduceOp) -> Result<Pending> {
        const OP: &str = "reduce_scatter";
        let (n, rank) = (self.size(), self.rank);
        row_block(x, n, rank)?; // checks dim 0 before posting
        let meta = vec![reduce_op_code(op)];
        Ok(
            self.collective(OP, Some(posted(x)?), meta, move |me, parts| {
                check_same_meta(me, OP, "reduce op", &parts)?;
                let ts = tensors(&parts);
                check_same_layout(me, OP, &ts)?;
                let blocks = ts
                    .iter()
                    .map(|t| row_block(t, n, rank))
                    .collect::<Result<Vec<_>>>()?;
                reduce_in_rank_order(&blocks, op)
            }),
        )
    }

    fn start_all_to_all_v(
        &self,
        x: &Tensor,
        send_rows: &[usize],
        recv_rows: &[usize],
    ) -> Result<Pending> {
        const OP: &str = "all_to_all_v";
        let (n, rank) = (self.size(), self.rank);
        check_counts(OP, "send_rows", send_rows, n)?;
        check_counts(OP, "recv_rows", recv_rows, n)?;
        check_rows_sum(OP, x, send_rows)?;
        let recv_rows = recv_rows.to_vec();
        let (rest, dtype) = (x.dims()[1..].to_vec(), x.dtype());
        Ok(self.collective(
            OP,
            Some(posted(x)?),
            send_rows.to_vec(),
            move |me, parts| {
                let mut pieces = Vec::with_capacity(n);
                for (src, p) in parts.iter().enumerate() {
                    let sent = p.meta[rank];
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
                    let t = p.tensor.as_ref().map(|t| rows_for(t, &p.meta, rank));
                    let Some(t) = t.transpose()? else { continue };
                    if t.dims()[1..] != rest[..] || t.dtype() != dtype {
                        return Err(CommError::Mismatch {
                            rank: me,
                            op: OP,
                            detail: format!(
                                "row shape {:?} {dtype} here but rank {src} sends {:?} {}",
                                rest,
                                &t.dims()[1..],
                                t.dtype()
                            ),
                        });
                    }
                    pieces.push(t);
                }
                cat_rows(&pieces, &rest, dtype)
            },
        ))
    }

    fn start_broadcast(&self, x: &Tensor, root: usize) -> Result<Pending> {
        const OP: &str = "broadcast";
        check_peer(OP, "root", root, self.size())?;
        Ok(
            self.collective(OP, Some(posted(x)?), vec![root], move |me, parts| {
                check_same_meta(me, OP, "root", &parts)?;
                let ts = tensors(&parts);
                check_same_layout(me, OP, &ts)?;
                Ok(ts[root].clone())
            }),
        )
    }

    fn send(&self, x: &Tensor, dst: usize, tag: u32) -> Result<()> {
        check_peer("send", "dst", dst, self.size())?;
        let mut st = lock(&self.board.state);
        st.mail
            .entry((self.rank, dst, tag))
            .or_default()
            .push_back(posted(x)?);
        drop(st);
        self.board.cv.notify_all();
        Ok(())
    }

    fn start_recv(&self, src: usize, tag: u32, shape: &[usize], dtype: DType) -> Result<Pending> {
        const OP: &str = "recv";
        check_peer(OP, "src", src, self.size())?;
        let (board, rank, shape) = (self.board.clone(), self.rank, shape.to_vec());
        Ok(Pending::deferred(move || {
            let key = (src, rank, tag);
            let t = board.wait_for(
                rank,
                OP,
                |st| st.mail.get_mut(&key).and_then(VecDeque::pop_front),
                |_| vec![src],
            )?;
            if t.dims() != shape || t.dtype() != dtype {
                return Err(CommError::Mismatch {
                    rank: board.members[rank],
                    op: OP,
                    detail: format!(
                        "expected {shape:?} {dtype} from rank {} tag {tag} but got {:?} {}",
                        board.members[src],
                        t.dims(),
                        t.dtype()
                    ),
                });
            }
            Ok(t)
        }))
    }

    fn barrier(&self) -> Result<()> {
        self.collective("barrier", None, vec![], |_, _| {
            Ok(Tensor::zeros([0], DType::F32, megamoe_tensor::Device::Cpu)?)
        })
        .wait()
        .map(|_| ())
    }

    fn split(&self, group: &[usize]) -> Result<Box<dyn Communicator>> {
        const OP: &str = "split";
        let n = self.size();
        check_group(self.world_rank(), self.rank, n, group)?;
        let split_no = self.splits.fetch_add(1, Ordering::Relaxed);
        let board = self.board.clone();
        let rank = self.rank;
        // Everyone posts its group; all must agree before any board is built.
        self.collective(OP, None, group.to_vec(), move |me, parts| {
            for p in &parts {
                for &m in &p.meta {
                    if parts[m].meta != p.meta {
                        return Err(CommError::Mismatch {
                            rank: me,
                            op: OP,
                            detail: format!(
                                "a member of group {:?} passed group {:?}; every member of a \
                                 group must pass the same list",
                                p.meta, parts[m].meta
                            ),
                        });
                    }
                }
            }
            Ok(Tensor::zeros([0], DType::F32, megamoe_tensor::Device::Cpu)?)
        })
        .wait()?;
        let world_members: Vec<usize> = group.iter().map(|&r| board.members[r]).collect();
        let key = (board.id, split_no, world_members.clone());
        let sub = {
            let mut splits = lock(&board.world.splits);
            let entry = splits.entry(key.clone()).or_insert_with(|| {
                let id = board.world.next_board.fetch_add(1, Ordering::Relaxed);
                (
                    Board::new(id, world_members, board.world.clone()),
                    group.len(),
                )
            });
            entry.1 -= 1;
            let sub = entry.0.clone();
            if entry.1 == 0 {
                splits.remove(&key);
            }
            sub
        };
        let new_rank = group
            .iter()
            .position(|&r| r == rank)
            .ok_or(CommError::InvalidArgument {
                op: OP,
                arg: "group",
                value: format!("{group:?}"),
                rule: "must contain the calling rank",
            })?;
        Ok(Box::new(ThreadComm::new(sub, new_rank)))
    }
}

/// Checks a split group: non-empty, ranks < size, no repeats, contains the caller.
pub(crate) fn check_group(
    world_rank: usize,
    rank: usize,
    size: usize,
    group: &[usize],
) -> Result<()> {
    let bad = |rule| CommError::InvalidArgument {
        op: "split",
        arg: "group",
        value: format!("{group:?} (caller rank {rank}, world rank {world_rank})"),
        rule,
    };
    if group.iter().any(|&r| r >= size) {
        return Err(bad(
            "every member must be a rank of the parent communicator",
        ));
    }
    let mut seen = group.to_vec();
    seen.sort_unstable();
    seen.dedup();
    if seen.len() != group.len() {
        return Err(bad("must not repeat a rank"));
    }
    if !group.contains(&rank) {
        return Err(bad("must contain the calling rank"));
    }
    Ok(())
}
