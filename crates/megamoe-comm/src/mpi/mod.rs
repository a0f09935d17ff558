//! The MPI engine (feature `mpi`): one rank per process, launched by `mpirun`.
//!
//! [`MpiWorld::init`] initialises MPI (`MPI_THREAD_SERIALIZED`; every MPI call of the
//! process holds one lock), [`MpiWorld::communicator`] gives the world [`MpiComm`], and
//! [`Communicator::split`](crate::Communicator::split) the sub-groups. Dropping the
//! `MpiWorld` finalizes MPI after the sends in flight are done.
//!
//! Guarantees, the same as thread ranks:
//! - reductions combine the ranks' contributions in rank order with
//!   [`reduce_in_rank_order`](crate::reduce_in_rank_order): the same bits as thread ranks
//!   (never `MPI_SUM`, whose order MPI leaves open);
//! - no call hangs: waits poll non-blocking requests against the communicator's timeout
//!   ([`CommError::Timeout`](crate::CommError::Timeout) names the ranks whose messages never
//!   came, e.g. a killed process), and a rank that fails calls
//!   [`MpiWorld::report_failure`], after which the others' calls return
//!   [`CommError::PeerFailed`](crate::CommError::PeerFailed) naming it;
//! - sends never block (buffered `MPI_Isend`s), so a pipeline's sends cannot deadlock.
//!
//! ```no_run
//! use megamoe_comm::{Communicator, MpiWorld, ReduceOp};
//! use megamoe_tensor::{Device, Tensor};
//! # fn main() -> megamoe_comm::Result<()> {
//! let world = MpiWorld::init()?; // under `mpirun -n 4`
//! let comm = world.communicator()?;
//! let x = Tensor::from_vec_f32(vec![comm.rank() as f32], [1], Device::Cpu)?;
//! let sum = comm.all_reduce(&x, ReduceOp::Sum)?; // [0+1+2+3] on every rank
//! # Ok(())
//! # }
//! ```

mod comm;
mod engine;
mod wire;

use std::sync::Arc;
use std::time::Duration;

use ::mpi::environment::Universe;
use ::mpi::Threading;

pub use comm::MpiComm;
use engine::{RawComm, Runtime};

use crate::error::{CommError, Result};

/// This process's MPI: its rank in `MPI_COMM_WORLD`, and the factory of communicators.
pub struct MpiWorld {
    universe: Option<Universe>,
    rt: Arc<Runtime>,
    world: RawComm,
    timeout: Duration,
}

impl std::fmt::Debug for MpiWorld {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MpiWorld")
            .field("rank", &self.rt.world_rank)
            .field("size", &self.rt.world_size)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl MpiWorld {
    /// Initialises MPI for this process (once per process), with the default timeout
    /// ([`DEFAULT_TIMEOUT`](crate::DEFAULT_TIMEOUT)).
    pub fn init() -> Result<MpiWorld> {
        let (universe, level) =
            ::mpi::initialize_with_threading(Threading::Serialized).ok_or(CommError::Mpi {
                rank: 0,
                detail: "MPI is already initialised in this process (MpiWorld::init runs once)"
                    .into(),
            })?;
        if level < Threading::Serialized {
            return Err(CommError::Mpi {
                rank: 0,
                detail: format!(
                    "this MPI library gives thread level {level:?}; megamoe needs Serialized"
                ),
            });
        }
        // SAFETY: RSMPI_COMM_WORLD is MPI_COMM_WORLD, valid once MPI is initialised.
        let world = RawComm(unsafe { ::mpi::ffi::RSMPI_COMM_WORLD });
        let rt = Arc::new(Runtime::new(world)?);
        Ok(MpiWorld {
            universe: Some(universe),
            rt,
            world,
            timeout: crate::DEFAULT_TIMEOUT,
        })
    }

    /// Sets how long a call waits for the other ranks (communicators made afterwards).
    pub fn with_timeout(mut self, timeout: Duration) -> MpiWorld {
        self.timeout = timeout;
        self
    }

    /// This process's rank in `MPI_COMM_WORLD`.
    pub fn rank(&self) -> usize {
        self.rt.world_rank
    }

    /// Number of processes in `MPI_COMM_WORLD`.
    pub fn size(&self) -> usize {
        self.rt.world_size
    }

    /// A communicator over every process (collective: every rank calls it, in the same
    /// order as its other communicator constructors). Each call gives a new, independent
    /// communicator.
    pub fn communicator(&self) -> Result<MpiComm> {
        let rank = self.rt.world_rank;
        let (coll, p2p) = {
            let _st = self.rt.lock()?;
            (
                engine::dup(rank, self.world)?,
                engine::dup(rank, self.world)?,
            )
        };
        Ok(MpiComm::new(
            self.rt.clone(),
            coll,
            p2p,
            rank,
            (0..self.rt.world_size).collect(),
            self.timeout,
        ))
    }

    /// Tells every other process that this rank failed with `reason`: their pending and
    /// later calls return [`CommError::PeerFailed`](crate::CommError::PeerFailed) naming this
    /// rank. Call it before exiting on an error (then exit without dropping the world:
    /// finalizing waits for the peers).
    pub fn report_failure(&self, reason: &str) {
        self.rt.report_failure(reason);
    }
}

impl Drop for MpiWorld {
    fn drop(&mut self) {
        self.rt.drain(Duration::from_secs(10));
        self.rt.mark_finalized();
        drop(self.universe.take()); // MPI_Finalize
    }
}
