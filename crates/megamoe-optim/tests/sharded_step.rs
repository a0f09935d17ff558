//! `Optimizer::step_sharded` on row shards equals `Optimizer::step` on the full parameters:
//! thread "ranks" each hold their `chunk` rows (uneven, one rank empty) of a Muon matrix
//! (with fused row blocks), an expert bank sharded over experts (never gathered) and an
//! AdamW-routed norm; the gather is a barrier over shared slots.

#![allow(clippy::unwrap_used)] // tests may unwrap (COMMON.md)

mod common;

use std::sync::{Arc, Barrier, Mutex};

use common::*;
use megamoe_optim::{NamedParams, OptimError, Optimizer, ParamRole, RowGather};
use megamoe_plan::{chunk, MuonScale, RowShard};
use megamoe_tensor::Tensor;

/// Every rank's rows of a matrix, gathered through shared slots and a barrier.
struct SlotGather {
    rank: usize,
    slots: Arc<Mutex<Vec<Option<Tensor>>>>,
    barrier: Arc<Barrier>,
    gathered: usize,
}

impl RowGather for SlotGather {
    fn gather_rows(
        &mut self,
        name: &str,
        local: &Tensor,
    ) -> Result<Option<(Tensor, RowShard)>, OptimError> {
        if name == "experts" {
            return Ok(None); // whole expert matrices
        }
        let world = self.slots.lock().unwrap().len();
        self.slots.lock().unwrap()[self.rank] = Some(local.clone());
        self.barrier.wait();
        let parts: Vec<Tensor> = self
            .slots
            .lock()
            .unwrap()
            .iter()
            .map(|t| t.clone().unwrap())
            .collect();
        self.barrier.wait();
        let refs: Vec<&Tensor> = parts.iter().collect();
        let full = Tensor::cat(&refs, 0)?;
        self.gathered += 1;
        let rows = chunk(full.dims()[0], world, self.rank);
        Ok(Some((full, rows)))
    }
}

const FUSED: [usize; 3] = [3, 2, 2];

fn full_params() -> NamedParams {
    let mut p = NamedParams::new();
    p.push("w", rand_t(1, &[7, 5]), ParamRole::Matrix);
    p.push("experts", rand_t(2, &[4, 3, 5]), ParamRole::ExpertBank);
    p.push("norm", rand_t(3, &[5]), ParamRole::Norm);
    p
}

fn grads(step: u64) -> NamedParams {
    let mut g = NamedParams::new();
    g.push("w", rand_t(100 + step, &[7, 5]), ParamRole::Matrix);
    g.push(
        "experts",
        rand_t(200 + step, &[4, 3, 5]),
        ParamRole::ExpertBank,
    );
    g.push("norm", rand_t(300 + step, &[5]), ParamRole::Norm);
    g
}

fn rows_of(p: &NamedParams, world: usize, rank: usize) -> NamedParams {
    p.map(|t| {
        let r = chunk(t.dims()[0], world, rank);
        t.narrow(0, r.start, r.len)
    })
    .unwrap()
}

#[test]
fn sharded_muon_step_equals_the_full_step() {
    let plan = muon_plan(0.01, 0.02, 0.1, MuonScale::Keller, true);
    let steps = 3;
    let mut full = full_params();
    let mut opt = Optimizer::new(&plan, &mut |f| full.visit("", f))
        .unwrap()
        .with_fused_split("w", &FUSED)
        .unwrap();
    for s in 0..steps {
        let g = grads(s);
        opt.step(&mut |f| full.visit_mut("", f), &mut |f| g.visit("", f), 0.5)
            .unwrap();
    }

    let world = 3;
    let slots = Arc::new(Mutex::new(vec![None; world]));
    let barrier = Arc::new(Barrier::new(world));
    let shards: Vec<(NamedParams, usize)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                let (slots, barrier) = (slots.clone(), barrier.clone());
                scope.spawn(move || {
                    let mut local = rows_of(&full_params(), world, rank);
                    let mut opt = Optimizer::new(&plan, &mut |f| local.visit("", f))
                        .unwrap()
                        .with_fused_split("w", &FUSED)
                        .unwrap();
                    let mut gather = SlotGather {
                        rank,
                        slots,
                        barrier,
                        gathered: 0,
                    };
                    for s in 0..steps {
                        let g = rows_of(&grads(s), world, rank);
                        opt.step_sharded(
                            &mut |f| local.visit_mut("", f),
                            &mut |f| g.visit("", f),
                            0.5,
                            &mut gather,
                        )
                        .unwrap();
                    }
                    (local, gather.gathered)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // 7 rows over 3 ranks: 3, 3, 1; 4 experts: 2, 2, 0 (an empty shard).
    assert_eq!(shards[2].0.get("experts").unwrap().dims(), &[0, 3, 5]);
    for (_, gathered) in &shards {
        assert_eq!(*gathered, steps as usize, "one gather per step: only `w`");
    }
    for (name, want, _) in &full.entries {
        let parts: Vec<&Tensor> = shards.iter().map(|(p, _)| p.get(name).unwrap()).collect();
        let got = Tensor::cat(&parts, 0).unwrap();
        let start = full_params();
        let moved = rel_err(&host(want), &host(start.get(name).unwrap()));
        assert!(moved > 1e-3, "{name} moved ({moved:e})");
        let e = rel_err(&host(&got), &host(want));
        assert!(e <= 1e-6, "{name}: sharded vs full rel err {e:e}");
    }
}

#[test]
fn a_failed_gather_names_the_parameter() {
    struct Broken;
    impl RowGather for Broken {
        fn gather_rows(
            &mut self,
            _: &str,
            _: &Tensor,
        ) -> Result<Option<(Tensor, RowShard)>, OptimError> {
            Err(OptimError::Gather {
                name: "w".to_string(),
                source: "rank 1 failed".into(),
            })
        }
    }
    let plan = muon_plan(0.01, 0.02, 0.1, MuonScale::Keller, true);
    let mut p = full_params();
    let mut opt = Optimizer::new(&plan, &mut |f| p.visit("", f)).unwrap();
    let g = grads(0);
    let err = opt
        .step_sharded(
            &mut |f| p.visit_mut("", f),
            &mut |f| g.visit("", f),
            0.5,
            &mut Broken,
        )
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("`w`") && msg.contains("rank 1 failed"),
        "{msg}"
    );
}
