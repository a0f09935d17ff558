//! The MPI runtime under [`MpiComm`](super::MpiComm): non-blocking point-to-point messages
//! polled against a deadline.
//!
//! Every MPI call of the process goes through [`Runtime::lock`] (MPI runs at
//! `MPI_THREAD_SERIALIZED`; the lock serialises the calls), and no call blocks while the
//! lock is held except the communicator constructors (`MPI_Comm_split` / `MPI_Comm_dup`,
//! which the ranks reach together after an exchange that is itself polled). Sends are
//! `MPI_Isend`s whose buffers the runtime keeps until they complete, so a send never blocks
//! and never deadlocks. A receive is `MPI_Improbe` (its size comes from the message) then
//! `MPI_Imrecv`, polled by [`Runtime::wait`] which returns:
//! - [`CommError::PeerFailed`] as soon as another rank has reported a failure (a note on the
//!   failure communicator, sent by [`Runtime::report_failure`]) or MPI reports an error on
//!   a message to or from a peer;
//! - [`CommError::Timeout`] naming the ranks whose messages never came, after the deadline.

use std::ffi::c_void;
use std::os::raw::c_int;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ::mpi::ffi;

use crate::error::{CommError, Result};

/// The tag of failure notes on the failure communicator.
const FAIL_TAG: c_int = 1;

/// An MPI communicator handle.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RawComm(pub(crate) ffi::MPI_Comm);

// SAFETY: an MPI communicator handle is a process-wide value owned by the MPI library; every
// call that uses it holds the runtime lock (MPI_THREAD_SERIALIZED), so it may move and be
// shared between threads.
unsafe impl Send for RawComm {}
// SAFETY: see `Send` above; the handle itself is never mutated.
unsafe impl Sync for RawComm {}

/// A send in flight and the buffer it reads from (kept alive until MPI is done with it).
struct InFlight {
    request: ffi::MPI_Request,
    _buffer: Vec<u8>,
    /// World rank of the destination, for error messages.
    peer: usize,
}

// SAFETY: the request handle is only passed to MPI under the runtime lock.
unsafe impl Send for InFlight {}

/// State guarded by the runtime lock.
pub(crate) struct State {
    sends: Vec<InFlight>,
    /// The first failure heard of: (world rank, reason).
    failure: Option<(usize, String)>,
    finalized: bool,
}

/// The process's MPI runtime: world rank and size, the failure communicator, and the lock
/// every MPI call holds.
pub(crate) struct Runtime {
    pub(crate) world_rank: usize,
    pub(crate) world_size: usize,
    /// Largest tag MPI accepts (`MPI_TAG_UB`, at least 32767).
    pub(crate) tag_ub: u32,
    fail_comm: RawComm,
    state: Mutex<State>,
}

/// One expected message: from communicator rank `src` with `tag`.
pub(crate) struct Expect {
    pub(crate) src: usize,
    pub(crate) tag: c_int,
    state: RecvState,
}

enum RecvState {
    Probing,
    Receiving(ffi::MPI_Request, Vec<u8>),
    Done(Vec<u8>),
}

// SAFETY: the request handle is only passed to MPI under the runtime lock.
unsafe impl Send for RecvState {}

impl Expect {
    /// A message to receive from communicator rank `src` with `tag`.
    pub(crate) fn new(src: usize, tag: c_int) -> Expect {
        Expect {
            src,
            tag,
            state: RecvState::Probing,
        }
    }

    /// The received bytes (empty before [`Runtime::wait`] succeeded).
    pub(crate) fn take(&mut self) -> Vec<u8> {
        match std::mem::replace(&mut self.state, RecvState::Probing) {
            RecvState::Done(b) => b,
            _ => Vec::new(),
        }
    }
}

/// A communicator's identity for [`Runtime::wait`]: handle, world ranks by communicator
/// rank, the timeout.
pub(crate) struct Peers<'a> {
    pub(crate) comm: RawComm,
    pub(crate) members: &'a [usize],
    pub(crate) timeout: Duration,
}

/// MPI's text for an error code.
fn error_string(code: c_int) -> String {
    let mut buf = vec![0u8; ffi::MPI_MAX_ERROR_STRING as usize + 1];
    let mut len: c_int = 0;
    // SAFETY: the buffer holds MPI_MAX_ERROR_STRING bytes as MPI_Error_string requires.
    let rc = unsafe { ffi::MPI_Error_string(code, buf.as_mut_ptr().cast(), &mut len) };
    if rc != ffi::MPI_SUCCESS as c_int {
        return format!("MPI error code {code}");
    }
    buf.truncate(len.max(0) as usize);
    String::from_utf8_lossy(&buf).into_owned()
}

/// `Ok` for `MPI_SUCCESS`, else [`CommError::Mpi`] naming the call.
pub(crate) fn check(rank: usize, call: &str, rc: c_int) -> Result<()> {
    if rc == ffi::MPI_SUCCESS as c_int {
        return Ok(());
    }
    Err(CommError::Mpi {
        rank,
        detail: format!("{call} failed: {}", error_string(rc)),
    })
}

/// A zero handle to be filled by MPI (handles are pointers in OpenMPI, integers in MPICH).
fn null_handle<T: Copy>() -> T {
    // SAFETY: only used for MPI handle types (a pointer or an integer), for which all-zero
    // bytes are a valid value; MPI overwrites it before it is read.
    unsafe { std::mem::zeroed() }
}

/// A zeroed status (filled by MPI).
fn empty_status() -> ffi::MPI_Status {
    // SAFETY: MPI_Status is a plain C struct of integers; all-zero is a valid value.
    unsafe { std::mem::zeroed() }
}

/// Sleep between polls: spin (yield) for the first 200 µs, then back off to 1 ms.
fn backoff(waited: Duration) {
    if waited < Duration::from_micros(200) {
        std::thread::yield_now();
    } else if waited < Duration::from_millis(20) {
        std::thread::sleep(Duration::from_micros(50));
    } else {
        std::thread::sleep(Duration::from_millis(1));
    }
}

impl Runtime {
    /// The runtime over an initialised MPI (`world` is `MPI_COMM_WORLD`).
    pub(crate) fn new(world: RawComm) -> Result<Runtime> {
        let (mut rank, mut size): (c_int, c_int) = (0, 0);
        // SAFETY: MPI is initialised; the out-pointers are valid.
        unsafe {
            check(0, "MPI_Comm_rank", ffi::MPI_Comm_rank(world.0, &mut rank))?;
            check(0, "MPI_Comm_size", ffi::MPI_Comm_size(world.0, &mut size))?;
        }
        let world_rank = rank.max(0) as usize;
        set_errors_return(world_rank, world)?;
        let mut tag_ub: *mut c_int = std::ptr::null_mut();
        let mut flag: c_int = 0;
        // SAFETY: MPI_TAG_UB's attribute value is a pointer to an int owned by MPI.
        unsafe {
            check(
                world_rank,
                "MPI_Comm_get_attr(MPI_TAG_UB)",
                ffi::MPI_Comm_get_attr(
                    world.0,
                    ffi::MPI_TAG_UB as c_int,
                    (&mut tag_ub as *mut *mut c_int).cast::<c_void>(),
                    &mut flag,
                ),
            )?;
        }
        let tag_ub = if flag != 0 && !tag_ub.is_null() {
            // SAFETY: MPI says the attribute is set and points to an int.
            unsafe { *tag_ub }.max(32767) as u32
        } else {
            32767
        };
        let fail_comm = dup(world_rank, world)?;
        Ok(Runtime {
            world_rank,
            world_size: size.max(1) as usize,
            tag_ub,
            fail_comm,
            state: Mutex::new(State {
                sends: Vec::new(),
                failure: None,
                finalized: false,
            }),
        })
    }

    /// Takes the lock every MPI call holds.
    pub(crate) fn lock(&self) -> Result<MutexGuard<'_, State>> {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.finalized {
            return Err(CommError::Mpi {
                rank: self.world_rank,
                detail: "MPI was finalized (the MpiWorld was dropped); no more calls".into(),
            });
        }
        Ok(st)
    }

    /// Starts sending `buf` to communicator rank `dst` (world rank `peer`) with `tag`; the
    /// runtime keeps the buffer until the send completes.
    pub(crate) fn isend(
        &self,
        st: &mut State,
        comm: RawComm,
        dst: usize,
        peer: usize,
        tag: c_int,
        buf: Vec<u8>,
    ) -> Result<()> {
        let count = c_int::try_from(buf.len()).map_err(|_| CommError::InvalidArgument {
            op: "send",
            arg: "message bytes",
            value: buf.len().to_string(),
            rule: "an MPI message must be under 2 GiB (split the tensor)",
        })?;
        let mut request = null_handle();
        // SAFETY: `buf` lives in `st.sends` until MPI_Test reports completion; the datatype
        // is bytes and `count` is its length.
        let rc = unsafe {
            ffi::MPI_Isend(
                buf.as_ptr().cast(),
                count,
                ffi::RSMPI_UINT8_T,
                dst as c_int,
                tag,
                comm.0,
                &mut request,
            )
        };
        check(self.world_rank, "MPI_Isend", rc).map_err(|e| self.peer_error(peer, e))?;
        st.sends.push(InFlight {
            request,
            _buffer: buf,
            peer,
        });
        Ok(())
    }

    /// Tests every send in flight and drops the finished ones.
    fn progress_sends(&self, st: &mut State) -> Result<()> {
        let mut i = 0;
        while i < st.sends.len() {
            let mut flag: c_int = 0;
            let mut status = empty_status();
            // SAFETY: the request came from MPI_Isend and was not completed yet.
            let rc = unsafe { ffi::MPI_Test(&mut st.sends[i].request, &mut flag, &mut status) };
            if rc != ffi::MPI_SUCCESS as c_int {
                let f = st.sends.swap_remove(i);
                let e = check(self.world_rank, "MPI_Test", rc).err();
                return Err(self.peer_error(
                    f.peer,
                    e.unwrap_or(CommError::Mpi {
                        rank: self.world_rank,
                        detail: "MPI_Test failed".into(),
                    }),
                ));
            }
            if flag != 0 {
                st.sends.swap_remove(i);
            } else {
                i += 1;
            }
        }
        Ok(())
    }

    /// An MPI error on a message with world rank `peer`: that peer is taken as failed.
    fn peer_error(&self, peer: usize, e: CommError) -> CommError {
        CommError::PeerFailed {
            rank: self.world_rank,
            op: "MPI message",
            failed_rank: peer,
            reason: e.to_string(),
        }
    }

    /// Advances one expected message; true when it has arrived.
    fn advance(&self, comm: RawComm, peer: usize, e: &mut Expect) -> Result<bool> {
        let me = self.world_rank;
        if let RecvState::Probing = e.state {
            let mut flag: c_int = 0;
            let mut message = null_handle();
            let mut status = empty_status();
            // SAFETY: out-pointers are valid; MPI is initialised and the lock is held.
            let rc = unsafe {
                ffi::MPI_Improbe(
                    e.src as c_int,
                    e.tag,
                    comm.0,
                    &mut flag,
                    &mut message,
                    &mut status,
                )
            };
            check(me, "MPI_Improbe", rc).map_err(|err| self.peer_error(peer, err))?;
            if flag == 0 {
                return Ok(false);
            }
            let mut count: c_int = 0;
            // SAFETY: `status` was filled by a successful MPI_Improbe.
            let rc = unsafe { ffi::MPI_Get_count(&status, ffi::RSMPI_UINT8_T, &mut count) };
            check(me, "MPI_Get_count", rc)?;
            let mut buf = vec![0u8; count.max(0) as usize];
            let mut request = null_handle();
            // SAFETY: `buf` holds exactly the probed message's bytes and is moved into the
            // state together with the request, so it outlives the receive.
            let rc = unsafe {
                ffi::MPI_Imrecv(
                    buf.as_mut_ptr().cast(),
                    count,
                    ffi::RSMPI_UINT8_T,
                    &mut message,
                    &mut request,
                )
            };
            check(me, "MPI_Imrecv", rc).map_err(|err| self.peer_error(peer, err))?;
            e.state = RecvState::Receiving(request, buf);
        }
        if let RecvState::Receiving(request, _) = &mut e.state {
            let mut flag: c_int = 0;
            let mut status = empty_status();
            // SAFETY: the request came from MPI_Imrecv and was not completed yet.
            let rc = unsafe { ffi::MPI_Test(request, &mut flag, &mut status) };
            check(me, "MPI_Test", rc).map_err(|err| self.peer_error(peer, err))?;
            if flag == 0 {
                return Ok(false);
            }
            if let RecvState::Receiving(_, buf) =
                std::mem::replace(&mut e.state, RecvState::Probing)
            {
                e.state = RecvState::Done(buf);
            }
        }
        Ok(matches!(e.state, RecvState::Done(_)))
    }

    /// A failure note from another rank, if one has arrived (recorded as the failure).
    fn poll_failure_note(&self, st: &mut State) -> Option<(usize, String)> {
        if st.failure.is_some() {
            return st.failure.clone();
        }
        let mut note = Expect::new(0, FAIL_TAG);
        let mut flag: c_int = 0;
        let mut status = empty_status();
        // SAFETY: out-pointers are valid; the lock is held.
        let rc = unsafe {
            ffi::MPI_Iprobe(
                ffi::RSMPI_ANY_SOURCE,
                FAIL_TAG,
                self.fail_comm.0,
                &mut flag,
                &mut status,
            )
        };
        if rc != ffi::MPI_SUCCESS as c_int || flag == 0 {
            return None;
        }
        let src = status.MPI_SOURCE.max(0) as usize;
        note.src = src;
        // The note is small (sent eagerly); read it with a short deadline of its own.
        let start = Instant::now();
        let reason = loop {
            match self.advance(self.fail_comm, src, &mut note) {
                Ok(true) => break String::from_utf8_lossy(&note.take()).into_owned(),
                Ok(false) if start.elapsed() < Duration::from_secs(2) => backoff(start.elapsed()),
                _ => break "(its message could not be read)".into(),
            }
        };
        st.failure = Some((src, reason));
        st.failure.clone()
    }

    /// Waits until every message in `expects` has arrived (on `peers.comm`), polling sends
    /// in flight and failure notes; errors as the module docs say. `op` names the caller.
    pub(crate) fn wait(
        &self,
        peers: &Peers<'_>,
        op: &'static str,
        expects: &mut [Expect],
    ) -> Result<()> {
        let start = Instant::now();
        let me = self.world_rank;
        loop {
            {
                let mut st = self.lock()?;
                self.progress_sends(&mut st)?;
                let mut done = true;
                for e in expects.iter_mut() {
                    if !matches!(e.state, RecvState::Done(_)) {
                        let peer = peers.members[e.src];
                        done &= self.advance(peers.comm, peer, e)?;
                    }
                }
                if done {
                    return Ok(());
                }
                if let Some((failed_rank, reason)) = self.poll_failure_note(&mut st) {
                    return Err(CommError::PeerFailed {
                        rank: me,
                        op,
                        failed_rank,
                        reason,
                    });
                }
            }
            let waited = start.elapsed();
            if waited >= peers.timeout {
                let mut missing: Vec<usize> = expects
                    .iter()
                    .filter(|e| !matches!(e.state, RecvState::Done(_)))
                    .map(|e| peers.members[e.src])
                    .collect();
                missing.dedup();
                return Err(CommError::Timeout {
                    rank: me,
                    op,
                    waited,
                    missing,
                });
            }
            backoff(waited);
        }
    }

    /// Tells every other rank that this one failed with `reason` (their waits then return
    /// [`CommError::PeerFailed`] naming it), and waits up to two seconds for the notes to
    /// leave. Errors are ignored: the peers may be gone already.
    pub(crate) fn report_failure(&self, reason: &str) {
        let Ok(mut st) = self.lock() else { return };
        if st.failure.is_none() {
            st.failure = Some((self.world_rank, reason.to_string()));
        }
        for peer in (0..self.world_size).filter(|&p| p != self.world_rank) {
            let bytes = reason.as_bytes()[..reason.len().min(4000)].to_vec();
            let _ = self.isend(&mut st, self.fail_comm, peer, peer, FAIL_TAG, bytes);
        }
        drop(st);
        self.drain(Duration::from_secs(2));
    }

    /// Waits up to `limit` for the sends in flight to complete.
    pub(crate) fn drain(&self, limit: Duration) {
        let start = Instant::now();
        loop {
            let Ok(mut st) = self.lock() else { return };
            if self.progress_sends(&mut st).is_err() || st.sends.is_empty() {
                return;
            }
            drop(st);
            if start.elapsed() >= limit {
                return;
            }
            backoff(start.elapsed());
        }
    }

    /// Marks MPI finalized: later calls return an error instead of touching MPI.
    pub(crate) fn mark_finalized(&self) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.finalized = true;
        st.sends.clear();
    }
}

/// Makes MPI return errors on `comm` instead of aborting the job.
pub(crate) fn set_errors_return(rank: usize, comm: RawComm) -> Result<()> {
    // SAFETY: `comm` is a valid communicator; MPI_ERRORS_RETURN is a predefined handler.
    let rc = unsafe { ffi::MPI_Comm_set_errhandler(comm.0, ffi::RSMPI_ERRORS_RETURN) };
    check(rank, "MPI_Comm_set_errhandler", rc)
}

/// `MPI_Comm_dup` (collective over `comm`), returning errors instead of aborting.
pub(crate) fn dup(rank: usize, comm: RawComm) -> Result<RawComm> {
    let mut out = null_handle();
    // SAFETY: `comm` is a valid communicator and `out` a valid out-pointer.
    check(rank, "MPI_Comm_dup", unsafe {
        ffi::MPI_Comm_dup(comm.0, &mut out)
    })?;
    let out = RawComm(out);
    set_errors_return(rank, out)?;
    Ok(out)
}

/// `MPI_Comm_split` (collective over `comm`): ranks with the same `color` form one
/// communicator, ordered by `key`.
pub(crate) fn split(rank: usize, comm: RawComm, color: usize, key: usize) -> Result<RawComm> {
    let mut out = null_handle();
    // SAFETY: `comm` is a valid communicator and `out` a valid out-pointer.
    let rc = unsafe { ffi::MPI_Comm_split(comm.0, color as c_int, key as c_int, &mut out) };
    check(rank, "MPI_Comm_split", rc)?;
    let out = RawComm(out);
    set_errors_return(rank, out)?;
    Ok(out)
}
