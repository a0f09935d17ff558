//! An in-memory [`RowExchange`] for tests: the ranks of one group are threads of this
//! process exchanging blocks through shared mailboxes.

use std::sync::{Arc, Barrier, Mutex};

use megamoe_moe::RowExchange;
use megamoe_tensor::Tensor;

/// Mailboxes shared by the ranks of one in-memory group.
#[derive(Debug)]
pub struct Hub {
    world: usize,
    mail: Mutex<Vec<Option<Tensor>>>,
    barrier: Barrier,
}

/// One rank's handle on a [`Hub`]: `all_to_all_v` by deposit, barrier, collect, barrier.
#[derive(Debug)]
pub struct InMemoryExchange {
    rank: usize,
    hub: Arc<Hub>,
}

pub fn group(world: usize) -> Vec<InMemoryExchange> {
    let hub = Arc::new(Hub {
        world,
        mail: Mutex::new(vec![None; world * world]),
        barrier: Barrier::new(world),
    });
    (0..world)
        .map(|rank| InMemoryExchange {
            rank,
            hub: hub.clone(),
        })
        .collect()
}

impl RowExchange for InMemoryExchange {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.hub.world
    }

    fn all_to_all_v(
        &self,
        send: &Tensor,
        send_rows: &[usize],
        recv_rows: &[usize],
    ) -> megamoe_moe::Result<Tensor> {
        let p = self.hub.world;
        assert_eq!(send_rows.iter().sum::<usize>(), send.dims()[0]);
        let mut start = 0;
        for (q, &n) in send_rows.iter().enumerate() {
            let block = send.narrow(0, start, n)?;
            self.hub.mail.lock().unwrap()[self.rank * p + q] = Some(block);
            start += n;
        }
        self.hub.barrier.wait();
        let blocks: Vec<Tensor> = (0..p)
            .map(|q| {
                self.hub.mail.lock().unwrap()[q * p + self.rank]
                    .take()
                    .unwrap()
            })
            .collect();
        self.hub.barrier.wait();
        for (q, b) in blocks.iter().enumerate() {
            assert_eq!(b.dims()[0], recv_rows[q], "rank {} from {q}", self.rank);
        }
        let refs: Vec<&Tensor> = blocks.iter().collect();
        Ok(Tensor::cat(&refs, 0)?)
    }
}
