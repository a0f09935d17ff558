//! The executor runs every schedule kind over thread ranks and gives the
//! same losses and gradients, bit for bit, as running the same stages
//! sequentially on one thread (micro-batch by micro-batch, along each chain).
//!
//! Toy stages: `y = act(x·W)` with a leaky activation (slope 1/2 below 0),
//! an auxiliary loss `α/2·Σy²` on every stage that is not last in its chain
//! (its gradient enters that stage's own backward), and `½·Σ(y−t)²` on the
//! last stage. Gradients are analytic; weight gradients are kept per
//! micro-batch and summed in micro-batch order, so the sum does not depend
//! on when W ran. A swapped activation/gradient, a wrong micro-batch or a
//! missing aux gradient changes the numbers.

#![allow(clippy::unwrap_used)] // test helpers may unwrap, as tests may

use megamoe_pipeline::executor::{channel_mesh, BoxError};
use megamoe_pipeline::{
    generate, run_rank, sum_shared_gradients, validate, ExecError, PipelineShape, Schedule,
    SharedGroup, Stage,
};
use megamoe_plan::ScheduleKind;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const D: usize = 4;
const AUX: f64 = 0.25;

type Vector = Vec<f64>;

#[derive(Debug, Clone)]
struct Toy {
    model_stage: usize,
    first: bool,
    last: bool,
    weight: Vec<f64>, // D x D, row-major: y_j = Σ_i x_i W_ij
    fail_at: Option<usize>,
    // Kept per micro-batch until its backward: input and pre-activation.
    saved: BTreeMap<usize, (Vector, Vector)>,
    // Pre-activation gradient, from backward_input until backward_weight.
    pending: BTreeMap<usize, (Vector, Vector)>,
    weight_grads: BTreeMap<usize, Vec<f64>>,
    losses: BTreeMap<usize, f64>,
    shared_total: Option<Vec<f64>>,
}

fn input_of(mb: usize) -> Vector {
    (0..D).map(|i| ((mb * 3 + i) % 7) as f64 - 3.0).collect()
}

fn target_of(mb: usize) -> Vector {
    (0..D).map(|i| ((mb + 2 * i) % 5) as f64 - 2.0).collect()
}

impl Toy {
    fn new(model_stage: usize, first: bool, last: bool) -> Toy {
        let weight = (0..D * D)
            .map(|k| (((model_stage * 7 + k * 3 + k / D) % 5) as f64 - 2.0) * 0.375)
            .collect();
        Toy {
            model_stage,
            first,
            last,
            weight,
            fail_at: None,
            saved: BTreeMap::new(),
            pending: BTreeMap::new(),
            weight_grads: BTreeMap::new(),
            losses: BTreeMap::new(),
            shared_total: None,
        }
    }

    /// Σ over micro-batches, in micro-batch order.
    fn gradient(&self) -> Vec<f64> {
        let mut g = vec![0.0; D * D];
        for w in self.weight_grads.values() {
            for (a, b) in g.iter_mut().zip(w) {
                *a += b;
            }
        }
        g
    }
}

impl Stage for Toy {
    type Tensor = Vector;

    fn forward(&mut self, mb: usize, input: Option<Vector>) -> Result<Vector, BoxError> {
        if self.fail_at == Some(mb) {
            return Err(format!("toy stage {} refuses micro-batch {mb}", self.model_stage).into());
        }
        let x = match (self.first, input) {
            (true, None) => input_of(mb),
            (false, Some(x)) => x,
            (first, got) => {
                return Err(format!("first={first} but input present={}", got.is_some()).into())
            }
        };
        let h: Vector = (0..D)
            .map(|j| (0..D).map(|i| x[i] * self.weight[i * D + j]).sum())
            .collect();
        let y: Vector = h
            .iter()
            .map(|&v| if v < 0.0 { 0.5 * v } else { v })
            .collect();
        if self.last {
            let t = target_of(mb);
            let loss = 0.5
                * y.iter()
                    .zip(&t)
                    .map(|(a, b)| (a - b) * (a - b))
                    .sum::<f64>();
            self.losses.insert(mb, loss);
        }
        self.saved.insert(mb, (x, h));
        Ok(y)
    }

    fn backward_input(
        &mut self,
        mb: usize,
        grad: Option<Vector>,
    ) -> Result<Option<Vector>, BoxError> {
        let (x, h) = self.saved.remove(&mb).ok_or("backward before forward")?;
        let y: Vector = h
            .iter()
            .map(|&v| if v < 0.0 { 0.5 * v } else { v })
            .collect();
        let dy: Vector = match (self.last, grad) {
            (true, None) => y.iter().zip(target_of(mb)).map(|(a, b)| a - b).collect(),
            // Aux loss α/2·Σy² injected here, on the stage that produced it.
            (false, Some(g)) => g.iter().zip(&y).map(|(g, y)| g + AUX * y).collect(),
            (last, got) => {
                return Err(format!("last={last} but grad present={}", got.is_some()).into())
            }
        };
        let dh: Vector = dy
            .iter()
            .zip(&h)
            .map(|(d, &v)| if v < 0.0 { 0.5 * d } else { *d })
            .collect();
        let dx: Vector = (0..D)
            .map(|i| (0..D).map(|j| self.weight[i * D + j] * dh[j]).sum())
            .collect();
        self.pending.insert(mb, (x, dh));
        Ok((!self.first).then_some(dx))
    }

    fn backward_weight(&mut self, mb: usize) -> Result<(), BoxError> {
        let (x, dh) = self.pending.remove(&mb).ok_or("W before I")?;
        let g = (0..D * D).map(|k| x[k / D] * dh[k % D]).collect();
        self.weight_grads.insert(mb, g);
        Ok(())
    }

    fn shared_gradient(&mut self, group: SharedGroup) -> Option<Vector> {
        (group == SharedGroup::ModelStage(self.model_stage)).then(|| self.gradient())
    }

    fn accumulate(&self, total: &mut Vector, part: &Vector) {
        for (a, b) in total.iter_mut().zip(part) {
            *a += b;
        }
    }

    fn set_shared_gradient(&mut self, _group: SharedGroup, total: Vector) {
        self.shared_total = Some(total);
    }
}

fn toy_stages(s: &Schedule) -> BTreeMap<usize, Toy> {
    (0..s.stage_map.stages())
        .map(|st| {
            let m = s.stage_map.model_stage(st).unwrap();
            let toy = Toy::new(m, s.prev_stage(st).is_none(), s.next_stage(st).is_none());
            (st, toy)
        })
        .collect()
}

/// Stage → (losses by micro-batch, weight gradient after shared sums).
type Outcome = BTreeMap<usize, (BTreeMap<usize, f64>, Vec<f64>)>;

fn outcome(stages: &BTreeMap<usize, Toy>) -> Outcome {
    stages
        .iter()
        .map(|(&s, t)| {
            let g = t.shared_total.clone().unwrap_or_else(|| t.gradient());
            (s, (t.losses.clone(), g))
        })
        .collect()
}

/// One thread, no pipeline: each micro-batch forward along its chain, then
/// backward (I then W) in reverse; then mirrored copies summed in stage order.
fn sequential(s: &Schedule) -> Outcome {
    let mut stages = toy_stages(s);
    for chain in &s.chains {
        for mb in chain.microbatches.clone() {
            let mut x = None;
            for st in &chain.stages {
                x = Some(stages.get_mut(st).unwrap().forward(mb, x).unwrap());
            }
            let mut g = None;
            for st in chain.stages.iter().rev() {
                let stage = stages.get_mut(st).unwrap();
                g = stage.backward_input(mb, g).unwrap();
                stage.backward_weight(mb).unwrap();
            }
        }
    }
    let mut by_model: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for st in 0..s.stage_map.stages() {
        by_model
            .entry(s.stage_map.model_stage(st).unwrap())
            .or_default()
            .push(st);
    }
    for copies in by_model.values().filter(|c| c.len() > 1) {
        let mut total = vec![0.0; D * D];
        for st in copies {
            for (a, b) in total.iter_mut().zip(stages[st].gradient()) {
                *a += b;
            }
        }
        for st in copies {
            stages.get_mut(st).unwrap().shared_total = Some(total.clone());
        }
    }
    outcome(&stages)
}

/// Runs `s` on one thread per rank; returns the outcome or the first error per rank.
fn threaded(
    s: &Schedule,
    fail: Option<(usize, usize)>,
) -> Vec<Result<BTreeMap<usize, Toy>, ExecError>> {
    let comm = validate(s).unwrap();
    let all = toy_stages(s);
    let transports = channel_mesh::<Vector>(s.ranks(), Duration::from_secs(60));
    let epoch = Instant::now();
    std::thread::scope(|scope| {
        let handles: Vec<_> = transports
            .into_iter()
            .enumerate()
            .map(|(rank, mut transport)| {
                let mut mine: BTreeMap<usize, Toy> = all
                    .iter()
                    .filter(|(st, _)| s.stage_map.rank(**st) == Some(rank))
                    .map(|(&st, t)| (st, t.clone()))
                    .collect();
                if let Some((stage, mb)) = fail {
                    if let Some(t) = mine.get_mut(&stage) {
                        t.fail_at = Some(mb);
                    }
                }
                let comm = &comm;
                scope.spawn(move || {
                    run_rank(s, comm, rank, &mut mine, &mut transport, epoch)?;
                    sum_shared_gradients(s, rank, &mut mine, &mut transport)?;
                    Ok(mine)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn cases() -> Vec<(ScheduleKind, usize, usize, usize)> {
    let mut v = Vec::new();
    for p in [1, 2, 3, 4] {
        for m in [p, 2 * p, 2 * p + 2, 3 * p + 1] {
            v.push((ScheduleKind::GPipe, p, m, 1));
            v.push((ScheduleKind::OneFOneB, p, m, 1));
            v.push((ScheduleKind::ZbH1, p, m, 1));
            v.push((ScheduleKind::Zbv, p, m, 1));
            v.push((ScheduleKind::DualPipeV, p, m, 1));
            v.push((ScheduleKind::DualPipe, p, m, 1));
            v.push((ScheduleKind::Interleaved, p, m, 2));
        }
    }
    v.push((ScheduleKind::DualPipe, 6, 12, 1));
    v.push((ScheduleKind::DualPipe, 8, 16, 1));
    v.push((ScheduleKind::DualPipeV, 6, 13, 1));
    v.push((ScheduleKind::Zbv, 6, 7, 1));
    v.push((ScheduleKind::Interleaved, 3, 6, 3));
    v
}

#[test]
fn every_kind_matches_sequential_stages_bit_for_bit() {
    let mut ran: std::collections::HashMap<ScheduleKind, usize> = Default::default();
    for (kind, ranks, microbatches, vpp) in cases() {
        let shape = PipelineShape {
            ranks,
            microbatches,
            vpp,
        };
        let Ok(s) = generate(kind, shape) else {
            continue;
        };
        let what = format!("{kind} pp={ranks} m={microbatches} vpp={vpp}");
        let expected = sequential(&s);
        let mut got = BTreeMap::new();
        for r in threaded(&s, None) {
            got.extend(outcome(&r.unwrap_or_else(|e| panic!("{what}: {e}"))));
        }
        assert_eq!(got.len(), s.stage_map.stages(), "{what}");
        for (st, (losses, grad)) in &expected {
            let (got_losses, got_grad) = &got[st];
            assert_eq!(got_losses, losses, "{what}: losses of stage {st}");
            assert_eq!(got_grad, grad, "{what}: gradient of stage {st}");
        }
        // The toy is not degenerate: every stage has a non-zero gradient.
        for (st, (_, grad)) in &got {
            assert!(
                grad.iter().any(|&g| g != 0.0),
                "{what}: zero gradient on stage {st}"
            );
        }
        // Every micro-batch's loss was computed exactly once.
        let n: usize = got.values().map(|(l, _)| l.len()).sum();
        assert_eq!(n, microbatches, "{what}");
        *ran.entry(kind).or_insert(0) += 1;
    }
    for kind in ScheduleKind::ALL {
        assert!(ran.get(&kind).copied().unwrap_or(0) >= 4, "{kind}: {ran:?}");
    }
}

#[test]
fn dualpipe_mirrored_copies_end_with_the_same_summed_gradient() {
    let s = generate(
        ScheduleKind::DualPipe,
        PipelineShape {
            ranks: 4,
            microbatches: 8,
            vpp: 1,
        },
    )
    .unwrap();
    let mut stages = BTreeMap::new();
    for r in threaded(&s, None) {
        stages.extend(r.unwrap());
    }
    for model_stage in 0..4 {
        let (a, b) = (&stages[&model_stage], &stages[&(4 + model_stage)]);
        // The two copies saw different micro-batches...
        assert_ne!(a.gradient(), b.gradient());
        // ...and both hold the same sum of the two.
        let sum: Vec<f64> = a
            .gradient()
            .iter()
            .zip(b.gradient())
            .map(|(x, y)| x + y)
            .collect();
        assert_eq!(a.shared_total.as_ref(), Some(&sum));
        assert_eq!(b.shared_total.as_ref(), Some(&sum));
    }
}

#[test]
fn a_failing_stage_fails_its_rank_and_its_peers_without_hanging() {
    let s = generate(
        ScheduleKind::OneFOneB,
        PipelineShape {
            ranks: 3,
            microbatches: 6,
            vpp: 1,
        },
    )
    .unwrap();
    let results = threaded(&s, Some((1, 2)));
    let msg =
        |r: &Result<_, ExecError>| r.as_ref().err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        matches!(results[1], Err(ExecError::Stage { rank: 1, .. })),
        "{}",
        msg(&results[1])
    );
    assert!(
        msg(&results[1]).contains("refuses micro-batch 2"),
        "{}",
        msg(&results[1])
    );
    for r in [0, 2] {
        assert!(
            matches!(results[r], Err(ExecError::Transport { peer: 1, .. })),
            "rank {r}: {}",
            msg(&results[r])
        );
        assert!(
            msg(&results[r]).contains("rank 1 has exited"),
            "{}",
            msg(&results[r])
        );
    }
}
