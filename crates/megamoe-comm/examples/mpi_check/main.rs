//! Checks every collective of the MPI engine against thread ranks, bit for bit, then the
//! failure paths (mismatch, timeout, a failed peer). Run under mpirun:
//!
//! ```text
//! cargo build --release -p megamoe-comm --features mpi --example mpi_check
//! mpirun -n 4 --oversubscribe target/release/examples/mpi_check
//! ```
//!
//! Each process runs the same suite twice: once over MPI (its rank of the job) and once
//! over `size` thread ranks inside the process; its MPI results must equal its thread
//! rank's bits. Exit 0 and one line per rank when every check passes; exit 1 naming the
//! first difference otherwise.

use std::time::{Duration, Instant};

use megamoe_comm::{
    reduce_in_rank_order, CommError, Communicator, GroupTable, MpiWorld, ReduceOp, ThreadWorld,
};
use megamoe_tensor::{DType, Device, Tensor};

/// Named results of a suite run on one rank, as bit patterns.
type Results = Vec<(String, Vec<u32>)>;

/// Deterministic inputs of `rank` whose sums depend on the order (mixed magnitudes).
fn input(rank: usize, salt: usize, len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| {
            let v = ((rank * 7919 + i * 104_729 + salt * 31) % 1000) as f32 * 0.37 - 123.0;
            if (i + rank).is_multiple_of(5) {
                v * 1.0e7
            } else {
                v
            }
        })
        .collect()
}

fn f32s(v: Vec<f32>, dims: &[usize]) -> megamoe_comm::Result<Tensor> {
    Ok(Tensor::from_vec_f32(v, dims.to_vec(), Device::Cpu)?)
}

fn bits(t: &Tensor) -> megamoe_comm::Result<Vec<u32>> {
    let mut out: Vec<u32> = t.dims().iter().map(|&d| d as u32).collect();
    match t.dtype() {
        DType::I32 => out.extend(t.to_host_i32()?.iter().map(|v| *v as u32)),
        DType::BF16 => out.extend(t.to_host_bf16()?.iter().map(|v| u32::from(v.to_bits()))),
        DType::F32 => out.extend(t.to_host_f32()?.iter().map(|v| v.to_bits())),
    }
    Ok(out)
}

/// Every collective, on `comm`; results by name.
fn suite(comm: &dyn Communicator) -> megamoe_comm::Result<Results> {
    let (r, n) = (comm.rank(), comm.size());
    let mut out: Results = Vec::new();
    let mut put = |name: &str, t: &Tensor| -> megamoe_comm::Result<()> {
        out.push((name.to_string(), bits(t)?));
        Ok(())
    };
    for (name, op, dims) in [
        ("all_reduce sum [5,3]", ReduceOp::Sum, vec![5, 3]),
        ("all_reduce mean [7]", ReduceOp::Mean, vec![7]),
        ("all_reduce max [2,2]", ReduceOp::Max, vec![2, 2]),
        ("all_reduce sum [1]", ReduceOp::Sum, vec![1]),
        ("all_reduce sum [0]", ReduceOp::Sum, vec![0]),
    ] {
        let len = dims.iter().product();
        put(name, &comm.all_reduce(&f32s(input(r, 1, len), &dims)?, op)?)?;
    }
    let b = f32s(input(r, 2, 9), &[9])?.to_dtype(DType::BF16)?;
    put(
        "all_reduce sum bf16 [9]",
        &comm.all_reduce(&b, ReduceOp::Sum)?,
    )?;
    // Two collectives in flight, waited in reverse order.
    let a = comm.start_all_reduce(&f32s(input(r, 3, 6), &[6])?, ReduceOp::Sum)?;
    let g = comm.start_all_gather(&f32s(input(r, 4, 4), &[2, 2])?)?;
    put("overlapped all_gather", &g.wait()?)?;
    put("overlapped all_reduce", &a.wait()?)?;
    put(
        "all_gather f32 [2,3]",
        &comm.all_gather(&f32s(input(r, 5, 6), &[2, 3])?)?,
    )?;
    let i = Tensor::from_vec_i32(vec![r as i32, -(r as i32), 7], [3], Device::Cpu)?;
    put("all_gather i32 [3]", &comm.all_gather(&i)?)?;
    for (name, op) in [
        ("reduce_scatter sum", ReduceOp::Sum),
        ("reduce_scatter mean", ReduceOp::Mean),
    ] {
        let x = f32s(input(r, 6, n * 2 * 3), &[n * 2, 3])?;
        put(name, &comm.reduce_scatter(&x, op)?)?;
    }
    // Uneven all-to-all, zero rows included, after the counts exchange.
    let send: Vec<usize> = (0..n).map(|j| (r + 2 * j) % 3).collect();
    let recv = comm.exchange_counts(&send)?;
    let counts: Vec<i32> = recv.iter().map(|&c| c as i32).collect();
    put(
        "exchange_counts",
        &Tensor::from_vec_i32(counts, [n], Device::Cpu)?,
    )?;
    let rows: usize = send.iter().sum();
    let x = f32s(input(r, 7, rows * 2), &[rows, 2])?;
    put("all_to_all_v", &comm.all_to_all_v(&x, &send, &recv)?)?;
    let x = f32s(input(r, 8, 4), &[4])?;
    put("broadcast root n-1", &comm.broadcast(&x, n - 1)?)?;
    // Tagged messages around the ring, received in another order than sent, and a burst of
    // 64 KiB sends before any receive (sends must not block).
    if n > 1 {
        let (next, prev) = ((r + 1) % n, (r + n - 1) % n);
        comm.send(&f32s(input(r, 9, 3), &[3])?, next, 7)?;
        comm.send(&f32s(input(r, 10, 2), &[2])?, next, 3)?;
        put("recv tag 3", &comm.recv(prev, 3, &[2], DType::F32)?)?;
        put("recv tag 7", &comm.recv(prev, 7, &[3], DType::F32)?)?;
        for k in 0..20 {
            comm.send(&f32s(input(r, 100 + k, 16384), &[16384])?, next, 11)?;
        }
        for k in 0..20 {
            let t = comm.recv(prev, 11, &[16384], DType::F32)?;
            put(&format!("burst recv {k}"), &t)?;
        }
    }
    // Sub-groups: even and odd ranks, then a table of two kinds.
    let parity: Vec<usize> = (0..n).filter(|j| j % 2 == r % 2).collect();
    let sub = comm.split(&parity)?;
    let x = f32s(input(r, 11, 5), &[5])?;
    put(
        "split parity all_reduce",
        &sub.all_reduce(&x, ReduceOp::Sum)?,
    )?;
    put("split parity all_gather", &sub.all_gather(&x)?)?;
    let halves = |k: usize| -> Vec<usize> {
        let h = n.div_ceil(2);
        if k == 0 {
            if r < h {
                (0..h).collect()
            } else {
                (h..n).collect()
            }
        } else {
            (0..n).rev().collect()
        }
    };
    let table = GroupTable::build(comm, &[0usize, 1], halves)?;
    let x = f32s(input(r, 12, 3), &[3])?;
    put(
        "table half sum",
        &table.get(0)?.all_reduce(&x, ReduceOp::Sum)?,
    )?;
    put("table reversed gather", &table.get(1)?.all_gather(&x)?)?;
    comm.barrier()?;
    Ok(out)
}

/// The failure paths: every rank must see the expected error.
fn failures(world: &MpiWorld, log: &mut Vec<String>) -> Result<(), String> {
    let n = world.size();
    if n < 2 {
        return Ok(());
    }
    let r = world.rank();
    let comm = world.communicator().map_err(|e| e.to_string())?;
    // Mismatched shapes: every rank gets a Mismatch.
    let len = if r == 0 { 3 } else { 4 };
    let x = f32s(vec![1.0; len], &[len]).map_err(|e| e.to_string())?;
    match comm.all_reduce(&x, ReduceOp::Sum) {
        Err(CommError::Mismatch { .. }) => log.push("mismatched shapes -> Mismatch".into()),
        other => return Err(format!("mismatched shapes gave {other:?}")),
    }
    // A rank that never joins: the others time out naming it.
    let last = n - 1;
    let short = world
        .communicator()
        .map_err(|e| e.to_string())?
        .with_timeout(Duration::from_secs(3));
    if r != last {
        let t0 = Instant::now();
        match short.barrier() {
            Err(CommError::Timeout { missing, .. }) if missing.contains(&last) => {
                log.push(format!(
                    "rank {last} absent -> Timeout naming it after {:.1} s",
                    t0.elapsed().as_secs_f64()
                ))
            }
            other => return Err(format!("an absent rank gave {other:?}")),
        }
    }
    // A rank that reports a failure: the others' next wait fails naming it.
    let fresh = world.communicator().map_err(|e| e.to_string())?;
    if r == 1 {
        world.report_failure("injected failure of mpi_check");
        log.push("reported a failure".into());
    } else {
        let t0 = Instant::now();
        match fresh.barrier() {
            Err(CommError::PeerFailed { failed_rank: 1, .. }) => log.push(format!(
                "rank 1 failed -> PeerFailed naming it after {:.2} s",
                t0.elapsed().as_secs_f64()
            )),
            other => return Err(format!("a failed rank gave {other:?}")),
        }
    }
    Ok(())
}

fn run(world: &MpiWorld) -> Result<Vec<String>, String> {
    let (r, n) = (world.rank(), world.size());
    let comm = world.communicator().map_err(|e| e.to_string())?;
    let mpi = suite(&comm).map_err(|e| format!("MPI suite: {e}"))?;
    let threads = ThreadWorld::new(n)
        .map(|w| w.run(|c| suite(&c)).map_err(|e| e.to_string()))
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("thread suite: {e}"))?;
    let reference = &threads[r];
    if mpi.len() != reference.len() {
        return Err(format!(
            "{} MPI results vs {} thread results",
            mpi.len(),
            reference.len()
        ));
    }
    for ((name, got), (_, want)) in mpi.iter().zip(reference) {
        if got != want {
            return Err(format!("{name}: MPI bits differ from thread rank {r}"));
        }
    }
    // One rank's rank-order sum of every rank's input, computed here.
    let parts: Vec<Tensor> = (0..n)
        .map(|k| f32s(input(k, 1, 15), &[5, 3]))
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let one = reduce_in_rank_order(&parts, ReduceOp::Sum)
        .and_then(|t| bits(&t))
        .map_err(|e| e.to_string())?;
    if mpi[0].1 != one {
        return Err("all_reduce sum differs from one rank's rank-order sum".into());
    }
    let mut log = vec![format!(
        "{} results equal to thread ranks bit for bit; all_reduce equals the rank-order sum",
        mpi.len()
    )];
    failures(world, &mut log)?;
    Ok(log)
}

fn main() -> std::process::ExitCode {
    let world = match MpiWorld::init() {
        Ok(w) => w.with_timeout(Duration::from_secs(60)),
        Err(e) => {
            eprintln!("mpi_check: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let (r, n) = (world.rank(), world.size());
    match run(&world) {
        Ok(log) => {
            for line in log {
                println!("mpi_check rank {r}/{n}: {line}");
            }
            drop(world);
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mpi_check rank {r}/{n}: FAILED: {e}");
            world.report_failure(&e);
            std::process::exit(1);
        }
    }
}
