//! Runs every schedule kind on thread ranks over toy stages (a D×D matrix
//! and a leaky activation per stage), then prints each rank's measured busy
//! and idle time next to the simulator's prediction under costs measured in
//! the same run (mean F, I, W, B, F&B durations).
//!
//! `cargo run --release -p megamoe-pipeline --example execute -- 4 8 256`
//! (ranks, micro-batches, D; defaults 4 8 128).

use megamoe_pipeline::executor::{channel_mesh, compare, measured_costs, BoxError};
use megamoe_pipeline::{generate, run_rank, simulate, validate, PipelineShape, Stage};
use megamoe_plan::ScheduleKind;
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

const ROWS: usize = 64;

/// `y = leaky(x·W)` on a [ROWS, D] batch; loss ½Σy² on the chain's last stage.
#[derive(Clone)]
struct Toy {
    d: usize,
    first: bool,
    last: bool,
    w: Vec<f32>,
    saved: HashMap<usize, (Vec<f32>, Vec<f32>)>,
    pending: HashMap<usize, (Vec<f32>, Vec<f32>)>,
    grad: Vec<f32>,
}

fn matmul(a: &[f32], b: &[f32], n: usize, k: usize, m: usize, ta: bool, tb: bool) -> Vec<f32> {
    let mut out = vec![0.0; n * m];
    for i in 0..n {
        for p in 0..k {
            let av = if ta { a[p * n + i] } else { a[i * k + p] };
            for j in 0..m {
                out[i * m + j] += av * if tb { b[j * k + p] } else { b[p * m + j] };
            }
        }
    }
    out
}

impl Stage for Toy {
    type Tensor = Vec<f32>;

    fn forward(&mut self, mb: usize, input: Option<Vec<f32>>) -> Result<Vec<f32>, BoxError> {
        let d = self.d;
        let x =
            input.unwrap_or_else(|| (0..ROWS * d).map(|i| ((i + mb) % 7) as f32 * 0.1).collect());
        let h = matmul(&x, &self.w, ROWS, d, d, false, false);
        let y = h
            .iter()
            .map(|&v| if v < 0.0 { 0.5 * v } else { v })
            .collect();
        self.saved.insert(mb, (x, h));
        Ok(y)
    }

    fn backward_input(
        &mut self,
        mb: usize,
        g: Option<Vec<f32>>,
    ) -> Result<Option<Vec<f32>>, BoxError> {
        let d = self.d;
        let (x, h) = self.saved.remove(&mb).ok_or("backward before forward")?;
        let dy = match g {
            Some(g) => g,
            None if self.last => h
                .iter()
                .map(|&v| if v < 0.0 { 0.5 * v } else { v })
                .collect(),
            None => return Err("missing output gradient".into()),
        };
        let dh: Vec<f32> = dy
            .iter()
            .zip(&h)
            .map(|(g, &v)| if v < 0.0 { 0.5 * g } else { *g })
            .collect();
        let dx = (!self.first).then(|| matmul(&dh, &self.w, ROWS, d, d, false, true));
        self.pending.insert(mb, (x, dh));
        Ok(dx)
    }

    fn backward_weight(&mut self, mb: usize) -> Result<(), BoxError> {
        let d = self.d;
        let (x, dh) = self.pending.remove(&mb).ok_or("W before I")?;
        for (a, b) in self
            .grad
            .iter_mut()
            .zip(matmul(&x, &dh, d, ROWS, d, true, false))
        {
            *a += b;
        }
        Ok(())
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| {
            a.parse::<usize>()
                .map_err(|e| format!("argument {a:?}: {e}"))
        })
        .collect::<Result<_, _>>()?;
    let ranks = args.first().copied().unwrap_or(4);
    let microbatches = args.get(1).copied().unwrap_or(8);
    let d = args.get(2).copied().unwrap_or(128);
    println!(
        "{ranks} ranks (threads), {microbatches} micro-batches, stages of [{ROWS}x{d}]·[{d}x{d}]"
    );
    println!(
        "{:12} {:>4} {:>9} {:>9} {:>7} {:>10}",
        "schedule", "rank", "busy ms", "idle ms", "idle %", "sim idle %"
    );
    for kind in ScheduleKind::ALL {
        let shape = PipelineShape {
            ranks,
            microbatches,
            vpp: 2,
        };
        let schedule = match generate(kind, shape) {
            Ok(s) => s,
            Err(e) => {
                println!("{:12} skipped: {e}", kind.name());
                continue;
            }
        };
        let comm = validate(&schedule)?;
        let transports = channel_mesh::<Vec<f32>>(ranks, Duration::from_secs(60));
        let epoch = Instant::now();
        let timings = std::thread::scope(|scope| {
            let handles: Vec<_> = transports
                .into_iter()
                .enumerate()
                .map(|(rank, mut transport)| {
                    let mut stages: BTreeMap<usize, Toy> = schedule
                        .stage_map
                        .stages_of(rank)
                        .into_iter()
                        .map(|s| {
                            let w = (0..d * d)
                                .map(|k| ((k * 31 + s) % 17) as f32 / 17.0 - 0.5)
                                .collect();
                            let toy = Toy {
                                d,
                                first: schedule.prev_stage(s).is_none(),
                                last: schedule.next_stage(s).is_none(),
                                w,
                                saved: HashMap::new(),
                                pending: HashMap::new(),
                                grad: vec![0.0; d * d],
                            };
                            (s, toy)
                        })
                        .collect();
                    let (schedule, comm) = (&schedule, &comm);
                    scope.spawn(move || {
                        run_rank(schedule, comm, rank, &mut stages, &mut transport, epoch)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .map_err(|_| "a rank thread panicked")?
                        .map_err(|e| e.to_string())
                })
                .collect::<Result<Vec<_>, _>>()
        })?;
        let sim = simulate(&schedule, &measured_costs(&timings))?;
        for row in compare(&timings, &sim) {
            println!(
                "{:12} {:>4} {:>9.2} {:>9.2} {:>6.1}% {:>9.1}%",
                kind.name(),
                row.rank,
                row.busy_s * 1e3,
                row.idle_s * 1e3,
                row.idle_fraction * 100.0,
                row.predicted_idle_fraction * 100.0
            );
        }
    }
    Ok(())
}
