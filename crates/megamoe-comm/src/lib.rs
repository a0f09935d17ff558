//! megamoe-comm: collectives between ranks, behind one [`Communicator`] trait.
//!
//! # Purpose
//! Every distributed piece of megamoe (data-parallel gradient reduction, FSDP shard gathers,
//! expert-parallel token exchange, pipeline sends) is written against [`Communicator`], whose
//! calls take and return [`megamoe_tensor::Tensor`]s. Engines:
//! - thread ranks ([`ThreadWorld`], [`ThreadComm`]): `n` ranks as threads of one process; the
//!   default, and what `cargo test` uses;
//! - MPI (feature `mpi`: [`MpiWorld`], [`MpiComm`]; launched by `mpirun`), one rank per
//!   process, on one host or many, with the same bits as thread ranks.
//!
//! [`LaunchEnv`] reads the launcher's variables (`OMPI_COMM_WORLD_*`, `PMI_*`, `RANK` /
//! `WORLD_SIZE` / `LOCAL_RANK`) with or without the feature.
//!
//! The trait takes no host slices, so an NCCL engine on CUDA streams fits it unchanged.
//!
//! # Guarantees
//! - Deterministic reductions: contributions are combined in rank order
//!   ([`reduce_in_rank_order`]); every rank gets identical bits, independent of timing.
//! - No hangs: a rank that fails (error, panic, killed process) makes every other rank's
//!   communicator calls fail with [`CommError::PeerFailed`] naming it, or with
//!   [`CommError::Timeout`] naming the ranks that never joined.
//! - Sub-communicators come from [`Communicator::split`]; build them once (see
//!   [`GroupTable`]).
//!
//! # Example
//! ```
//! use megamoe_comm::{Communicator, ReduceOp, ThreadWorld};
//! use megamoe_tensor::{Device, Tensor};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let sums = ThreadWorld::new(3)?.run(|comm| -> megamoe_comm::Result<Vec<f32>> {
//!     // rank r contributes [r, 1]; everyone gets [0+1+2, 1+1+1]
//!     let x = Tensor::from_vec_f32(vec![comm.rank() as f32, 1.0], [2], Device::Cpu)?;
//!     Ok(comm.all_reduce(&x, ReduceOp::Sum)?.to_host_f32()?)
//! })?;
//! assert!(sums.iter().all(|s| s == &vec![3.0, 3.0]));
//! # Ok(())
//! # }
//! ```
//!
//! # Place in the workspace
//! Depends on megamoe-tensor only. The mesh arithmetic (which ranks form the tensor-, data-,
//! expert- and pipeline-parallel groups) lives in megamoe-plan's `Mesh`; the trainer feeds
//! those member lists to [`GroupTable::build`].
#![deny(missing_docs)]

mod communicator;
mod error;
mod group;
mod launch;
mod local;
#[cfg(feature = "mpi")]
mod mpi;
mod reduce;

pub use communicator::{Communicator, Pending, ReduceOp};
pub use error::{CommError, Result};
pub use group::GroupTable;
pub use launch::LaunchEnv;
pub use local::{RankFailures, ThreadComm, ThreadWorld, DEFAULT_TIMEOUT};
#[cfg(feature = "mpi")]
pub use mpi::{MpiComm, MpiWorld};
pub use reduce::reduce_in_rank_order;
