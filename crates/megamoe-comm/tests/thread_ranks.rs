//! Thread-rank collectives checked against plain loops over the same numbers, plus the
//! failure paths (injected error, panic, missing rank, mismatched calls).

use std::time::Duration;

use megamoe_comm::{CommError, Communicator, GroupTable, ReduceOp, ThreadWorld};
use megamoe_tensor::{DType, Device, Tensor};

type R<T> = megamoe_comm::Result<T>;

fn vec_t(v: Vec<f32>, dims: &[usize]) -> Tensor {
    Tensor::from_vec_f32(v, dims.to_vec(), Device::Cpu).expect("tensor")
}

/// Rank r's contribution element i: values of very different magnitude so that the
/// summation order shows in the bits.
fn contrib(r: usize, i: usize) -> f32 {
    let mag = [1.0e7_f32, 3.1, -1.0e7, 0.37, 2.5e-3][(r + i) % 5];
    mag * (1.0 + i as f32 * 0.01)
}

#[test]
fn all_reduce_sums_in_rank_order_with_identical_bits_on_every_rank() {
    let (n, len) = (5, 17);
    // Reference: a plain left-to-right f32 loop over ranks 0..n.
    let want: Vec<f32> = (0..len)
        .map(|i| (1..n).fold(contrib(0, i), |acc, r| acc + contrib(r, i)))
        .collect();
    let want_max: Vec<f32> = (0..len)
        .map(|i| (0..n).map(|r| contrib(r, i)).fold(f32::MIN, f32::max))
        .collect();
    let got = ThreadWorld::new(n)
        .unwrap()
        .run(|comm| -> R<_> {
            let r = comm.rank();
            // Arrival order differs from rank order: later ranks post first.
            std::thread::sleep(Duration::from_millis(((n - r) * 3) as u64));
            let x = vec_t((0..len).map(|i| contrib(r, i)).collect(), &[len]);
            let sum = comm.all_reduce(&x, ReduceOp::Sum)?.to_host_f32()?;
            let mean = comm.all_reduce(&x, ReduceOp::Mean)?.to_host_f32()?;
            let max = comm.all_reduce(&x, ReduceOp::Max)?.to_host_f32()?;
            Ok((sum, mean, max))
        })
        .unwrap();
    for (sum, mean, max) in &got {
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(sum), bits(&want));
        let want_mean: Vec<f32> = want.iter().map(|s| s * (1.0 / n as f32)).collect();
        assert_eq!(bits(mean), bits(&want_mean));
        assert_eq!(max, &want_max);
    }
}

#[test]
fn all_gather_concatenates_rows_in_rank_order() {
    let got = ThreadWorld::new(3)
        .unwrap()
        .run(|comm| -> R<_> {
            let r = comm.rank() as f32;
            let x = vec_t(vec![r, r + 0.5, -r, 10.0 * r], &[2, 2]);
            let g = comm.all_gather(&x)?;
            Ok((g.dims().to_vec(), g.to_host_f32()?))
        })
        .unwrap();
    let want: Vec<f32> = (0..3)
        .flat_map(|r| {
            let r = r as f32;
            [r, r + 0.5, -r, 10.0 * r]
        })
        .collect();
    for (dims, v) in got {
        assert_eq!(dims, vec![6, 2]);
        assert_eq!(v, want);
    }
}

#[test]
fn reduce_scatter_keeps_this_ranks_block_of_the_sum() {
    let (n, c, h) = (4, 2, 3);
    let x_of = |r: usize| -> Vec<f32> { (0..n * c * h).map(|i| (r * 100 + i) as f32).collect() };
    let got = ThreadWorld::new(n)
        .unwrap()
        .run(|comm| -> R<_> {
            let x = vec_t(x_of(comm.rank()), &[n * c, h]);
            let y = comm.reduce_scatter(&x, ReduceOp::Sum)?;
            Ok((y.dims().to_vec(), y.to_host_f32()?))
        })
        .unwrap();
    for (r, (dims, v)) in got.into_iter().enumerate() {
        assert_eq!(dims, vec![c, h]);
        let want: Vec<f32> = (r * c * h..(r + 1) * c * h)
            .map(|i| (0..n).map(|s| x_of(s)[i]).sum())
            .collect();
        assert_eq!(v, want, "rank {r}");
    }
}

#[test]
fn reduce_scatter_rejects_rows_not_divisible_by_size() {
    let err = ThreadWorld::new(2)
        .unwrap()
        .run(|comm| -> R<()> {
            comm.reduce_scatter(&vec_t(vec![0.0; 3], &[3]), ReduceOp::Sum)?;
            Ok(())
        })
        .unwrap_err();
    assert!(err.first.1.contains("x.dims()[0]=3"), "{err}");
}

#[test]
fn all_to_all_v_routes_rows_by_counts() {
    let n = 3;
    // Rank s sends (s + d) % 3 rows to rank d; row k of that block holds 100s + 10d + k.
    let sends = |s: usize| -> Vec<usize> { (0..n).map(|d| (s + d) % 3).collect() };
    let got = ThreadWorld::new(n)
        .unwrap()
        .run(|comm| -> R<_> {
            let s = comm.rank();
            let send_rows = sends(s);
            let mut data = Vec::new();
            for (d, &k) in send_rows.iter().enumerate() {
                for k in 0..k {
                    data.extend([(100 * s + 10 * d + k) as f32, -1.0]);
                }
            }
            let rows: usize = send_rows.iter().sum();
            let x = vec_t(data, &[rows, 2]);
            let recv_rows = comm.exchange_counts(&send_rows)?;
            let y = comm.all_to_all_v(&x, &send_rows, &recv_rows)?;
            Ok((recv_rows, y.to_host_f32()?))
        })
        .unwrap();
    for (d, (recv_rows, y)) in got.into_iter().enumerate() {
        let want_counts: Vec<usize> = (0..n).map(|s| sends(s)[d]).collect();
        assert_eq!(recv_rows, want_counts);
        let mut want = Vec::new();
        for (s, &k) in want_counts.iter().enumerate() {
            for k in 0..k {
                want.extend([(100 * s + 10 * d + k) as f32, -1.0]);
            }
        }
        assert_eq!(y, want, "rank {d}");
    }
}

#[test]
fn all_to_all_v_with_wrong_recv_counts_is_a_mismatch_on_the_receiver() {
    let err = ThreadWorld::new(2)
        .unwrap()
        .run(|comm| -> R<()> {
            let x = vec_t(vec![1.0, 2.0], &[2]);
            // Both send one row to each rank, but rank 1 expects 2 rows from rank 0.
            let recv = if comm.rank() == 1 { [2, 1] } else { [1, 1] };
            comm.all_to_all_v(&x, &[1, 1], &recv)?;
            Ok(())
        })
        .unwrap_err();
    assert_eq!(err.first.0, 1, "{err}");
    assert!(err.first.1.contains("recv_rows[0]=2"), "{err}");
}

#[test]
fn broadcast_returns_the_roots_tensor() {
    let got = ThreadWorld::new(3)
        .unwrap()
        .run(|comm| -> R<_> {
            let x = vec_t(vec![comm.rank() as f32; 2], &[2]);
            Ok(comm.broadcast(&x, 2)?.to_host_f32()?)
        })
        .unwrap();
    assert!(got.iter().all(|v| v == &vec![2.0, 2.0]));
}

#[test]
fn tagged_messages_are_matched_by_tag_and_fifo_per_tag() {
    let got = ThreadWorld::new(2)
        .unwrap()
        .run(|comm| -> R<Vec<f32>> {
            if comm.rank() == 0 {
                comm.send(&vec_t(vec![1.0], &[1]), 1, 7)?;
                comm.send(&vec_t(vec![2.0], &[1]), 1, 7)?;
                comm.send(&vec_t(vec![3.0, 3.0], &[2]), 1, 9)?;
                return Ok(vec![]);
            }
            // Receive tag 9 first although it was sent last; then tag 7 in send order.
            let c = comm.recv(0, 9, &[2], DType::F32)?.to_host_f32()?;
            let a = comm.recv(0, 7, &[1], DType::F32)?.to_host_f32()?;
            let b = comm.recv(0, 7, &[1], DType::F32)?.to_host_f32()?;
            Ok([c, a, b].concat())
        })
        .unwrap();
    assert_eq!(got[1], vec![3.0, 3.0, 1.0, 2.0]);
}

#[test]
fn recv_of_the_wrong_shape_is_a_named_error() {
    let err = ThreadWorld::new(2)
        .unwrap()
        .run(|comm| -> R<()> {
            if comm.rank() == 0 {
                comm.send(&vec_t(vec![1.0, 2.0], &[2]), 1, 0)?;
            } else {
                comm.recv(0, 0, &[3], DType::F32)?;
            }
            Ok(())
        })
        .unwrap_err();
    assert_eq!(err.first.0, 1);
    assert!(err.first.1.contains("expected [3] f32") && err.first.1.contains("got [2] f32"));
}

#[test]
fn overlapped_collectives_complete_in_any_wait_order() {
    let got = ThreadWorld::new(2)
        .unwrap()
        .run(|comm| -> R<_> {
            let a = comm.start_all_reduce(&vec_t(vec![1.0], &[1]), ReduceOp::Sum)?;
            let b = comm.start_all_gather(&vec_t(vec![comm.rank() as f32], &[1]))?;
            let b = b.wait()?.to_host_f32()?;
            let a = a.wait()?.to_host_f32()?;
            Ok((a, b))
        })
        .unwrap();
    assert!(got
        .iter()
        .all(|(a, b)| a == &vec![2.0] && b == &vec![0.0, 1.0]));
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Even,
    Pair,
}

#[test]
fn split_groups_reduce_only_over_their_members() {
    // 4 ranks: Even groups {0,2} and {1,3}; Pair groups {0,1} and {2,3}.
    let got = ThreadWorld::new(4)
        .unwrap()
        .run(|comm| -> R<_> {
            let r = comm.rank();
            let groups = GroupTable::build(&comm, &[Kind::Even, Kind::Pair], |k| match k {
                Kind::Even => vec![r % 2, r % 2 + 2],
                Kind::Pair => vec![r / 2 * 2, r / 2 * 2 + 1],
            })?;
            let x = vec_t(vec![(1 << r) as f32], &[1]);
            let even = groups.get(Kind::Even)?;
            let pair = groups.get(Kind::Pair)?;
            let e = even.all_reduce(&x, ReduceOp::Sum)?.to_host_f32()?[0];
            let p = pair.all_reduce(&x, ReduceOp::Sum)?.to_host_f32()?[0];
            Ok((even.members().to_vec(), even.rank(), e, p))
        })
        .unwrap();
    assert_eq!(got[0], (vec![0, 2], 0, 5.0, 3.0));
    assert_eq!(got[1], (vec![1, 3], 0, 10.0, 3.0));
    assert_eq!(got[2], (vec![0, 2], 1, 5.0, 12.0));
    assert_eq!(got[3], (vec![1, 3], 1, 10.0, 12.0));
}

#[test]
fn inconsistent_split_groups_are_a_mismatch() {
    let err = ThreadWorld::new(3)
        .unwrap()
        .run(|comm| -> R<()> {
            // Rank 0 claims {0, 1}; rank 1 claims {1, 2}.
            let g = match comm.rank() {
                0 => vec![0, 1],
                _ => vec![1, 2],
            };
            comm.split(&g)?;
            Ok(())
        })
        .unwrap_err();
    assert!(err.first.1.contains("must pass the same list"), "{err}");
}

#[test]
fn an_injected_fault_stops_every_other_rank_naming_the_failed_rank() {
    let err = ThreadWorld::new(4)
        .unwrap()
        .run(|comm| -> R<()> {
            let x = vec_t(vec![1.0], &[1]);
            for step in 0..3 {
                if step == 1 && comm.rank() == 2 {
                    return Err(CommError::InvalidArgument {
                        op: "test",
                        arg: "step",
                        value: "1".into(),
                        rule: "injected fault",
                    });
                }
                comm.all_reduce(&x, ReduceOp::Sum)?;
            }
            Ok(())
        })
        .unwrap_err();
    assert_eq!(err.first.0, 2);
    assert_eq!(err.failures.len(), 4, "{err}");
    for (r, msg) in &err.failures {
        if *r != 2 {
            assert!(
                msg.contains("rank 2 failed") && msg.contains("injected fault"),
                "{msg}"
            );
        }
    }
}

#[test]
fn a_panicking_rank_is_reported_and_releases_a_waiting_receiver() {
    let err = ThreadWorld::new(2)
        .unwrap()
        .run(|comm| -> R<()> {
            if comm.rank() == 0 {
                panic!("boom in rank 0");
            }
            comm.recv(0, 0, &[1], DType::F32)?;
            Ok(())
        })
        .unwrap_err();
    assert_eq!(err.first.0, 0);
    assert!(err.first.1.contains("boom in rank 0"));
    let (_, msg) = &err.failures[1];
    assert!(msg.contains("rank 1: recv aborted: rank 0 failed"), "{msg}");
}

#[test]
fn a_rank_that_never_joins_times_out_naming_it() {
    let err = ThreadWorld::new(3)
        .unwrap()
        .with_timeout(Duration::from_millis(300))
        .run(|comm| -> R<()> {
            if comm.rank() != 1 {
                comm.barrier()?;
            }
            Ok(())
        })
        .unwrap_err();
    // Ranks 0 and 2 time out waiting for 1 (which returned without joining).
    let ranks: Vec<usize> = err.failures.iter().map(|f| f.0).collect();
    assert!(ranks.contains(&0) && !ranks.contains(&1), "{err}");
    let timed_out = err
        .failures
        .iter()
        .find(|f| f.1.contains("timed out"))
        .expect("a timeout");
    assert!(
        timed_out.1.contains("waiting for rank(s) [1]"),
        "{}",
        timed_out.1
    );
}

#[test]
fn different_collectives_in_the_same_position_are_a_mismatch() {
    let err = ThreadWorld::new(2)
        .unwrap()
        .run(|comm| -> R<()> {
            let x = vec_t(vec![1.0], &[1]);
            if comm.rank() == 0 {
                comm.all_reduce(&x, ReduceOp::Sum)?;
            } else {
                comm.all_gather(&x)?;
            }
            Ok(())
        })
        .unwrap_err();
    assert!(
        err.first
            .1
            .contains("called all_reduce but rank 1 called all_gather")
            || err
                .first
                .1
                .contains("called all_gather but rank 0 called all_reduce"),
        "{err}"
    );
}

#[test]
fn zero_ranks_is_a_named_error() {
    let err = ThreadWorld::new(0).unwrap_err();
    assert!(err.to_string().contains("size=0"), "{err}");
}
