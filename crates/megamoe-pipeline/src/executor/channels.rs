//! In-process [`Transport`]: one unbounded FIFO channel per ordered pair of
//! ranks, for pipeline ranks that are threads of one process (tests, the
//! executor example). A `recv` that waits longer than the timeout, or whose
//! peer has dropped its end, is an error naming the peer — never a hang.

use super::{BoxError, Transport};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::time::Duration;

/// One rank's ends of the channels to and from every other rank.
#[derive(Debug)]
pub struct ChannelTransport<T> {
    rank: usize,
    to: Vec<Sender<T>>,
    from: Vec<Receiver<T>>,
    timeout: Duration,
}

/// Channels between `ranks` thread ranks: element `r` is rank `r`'s transport.
/// A `recv` fails after `timeout` without a message.
pub fn channel_mesh<T>(ranks: usize, timeout: Duration) -> Vec<ChannelTransport<T>> {
    // senders[src][dst], receivers[dst][src]
    let mut senders: Vec<Vec<Sender<T>>> = (0..ranks).map(|_| Vec::new()).collect();
    let mut receivers: Vec<Vec<Option<Receiver<T>>>> = (0..ranks)
        .map(|_| (0..ranks).map(|_| None).collect())
        .collect();
    for (src, row) in senders.iter_mut().enumerate() {
        for dst_row in receivers.iter_mut() {
            let (tx, rx) = channel();
            row.push(tx);
            dst_row[src] = Some(rx);
        }
    }
    senders
        .into_iter()
        .zip(receivers)
        .enumerate()
        .map(|(rank, (to, from))| ChannelTransport {
            rank,
            to,
            from: from.into_iter().flatten().collect(),
            timeout,
        })
        .collect()
}

/// The peer is not a rank of the mesh, has gone, or sent nothing in time.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChannelError {
    /// Peer index out of range.
    #[error("rank {rank}: peer {peer} is not one of the {ranks} ranks")]
    NoSuchPeer {
        /// This rank.
        rank: usize,
        /// The peer asked for.
        peer: usize,
        /// Ranks in the mesh.
        ranks: usize,
    },
    /// The peer's end of the channel is gone (its thread ended or failed).
    #[error("rank {rank}: rank {peer} has exited (channel closed)")]
    PeerGone {
        /// This rank.
        rank: usize,
        /// The peer.
        peer: usize,
    },
    /// Nothing arrived within the timeout.
    #[error("rank {rank}: no message from rank {peer} within {seconds} s")]
    Timeout {
        /// This rank.
        rank: usize,
        /// The peer.
        peer: usize,
        /// The timeout.
        seconds: f64,
    },
}

impl<T: Send + 'static> Transport<T> for ChannelTransport<T> {
    fn send(&mut self, peer: usize, tensor: T) -> Result<(), BoxError> {
        let (rank, ranks) = (self.rank, self.to.len());
        let tx = self
            .to
            .get(peer)
            .ok_or(ChannelError::NoSuchPeer { rank, peer, ranks })?;
        tx.send(tensor)
            .map_err(|_| ChannelError::PeerGone { rank, peer })?;
        Ok(())
    }

    fn recv(&mut self, peer: usize) -> Result<T, BoxError> {
        let (rank, ranks) = (self.rank, self.from.len());
        let rx = self
            .from
            .get(peer)
            .ok_or(ChannelError::NoSuchPeer { rank, peer, ranks })?;
        rx.recv_timeout(self.timeout).map_err(|e| {
            let err: BoxError = match e {
                RecvTimeoutError::Timeout => Box::new(ChannelError::Timeout {
                    rank,
                    peer,
                    seconds: self.timeout.as_secs_f64(),
                }),
                RecvTimeoutError::Disconnected => Box::new(ChannelError::PeerGone { rank, peer }),
            };
            err
        })
    }
}
