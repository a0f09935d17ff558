//! The simulator: per-kind costs → start/end time of every action, makespan,
//! bubble, and per-rank peak in-flight activations and parameter copies.
//!
//! Timing model: a rank runs its actions in program order, one at a time; an
//! action starts when the rank is free and every op it needs has ended
//! (plus `comm` when the producer is on another rank): F(s,m) after
//! F(s−1,m); I/B(s,m) after F(s,m) and I/B(s+1,m) (the loss sits after the
//! last stage); W(s,m) after I(s,m). An OVERLAP_F_B unit costs `FB` (default
//! F + B: no overlap gain unless you say so). SEND/RECV/FSDP ops take no time.
//!
//! Memory model: a stage-chunk of activations is *in flight* from its F until
//! its B, or until its W when the backward is split (I frees only the part W
//! does not need; we count the chunk until W — an upper bound). Inside an
//! OVERLAP_F_B unit the forward's chunk is allocated before the backward's is
//! freed. Parameter copies = stages held by the rank (stages of equal size).

use crate::comm_pass::insert_send_recv;
use crate::error::{Error, Result};
use crate::ir::{Action, Op, OpKind};
use crate::schedule::{Event, Schedule, Topology};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::str::FromStr;

/// Duration of each compute kind on one stage.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct KindCosts {
    /// Forward.
    pub f: f64,
    /// Backward for input.
    pub i: f64,
    /// Backward for weights.
    pub w: f64,
    /// Full backward.
    pub b: f64,
    /// An overlapped F and B unit (`None`: F + B).
    pub fb: Option<f64>,
}

impl KindCosts {
    fn of(&self, kind: OpKind) -> f64 {
        match kind {
            OpKind::F => self.f,
            OpKind::I => self.i,
            OpKind::W => self.w,
            OpKind::B => self.b,
            _ => 0.0,
        }
    }
}

/// Costs for a simulation: defaults, per-stage overrides, p2p latency.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Costs {
    /// Costs of every stage without an override.
    pub default: KindCosts,
    /// Stage → its own costs.
    pub per_stage: BTreeMap<usize, KindCosts>,
    /// Time added to every dependency between two ranks.
    pub comm: f64,
}

impl Default for Costs {
    /// F = I = W = 1, B = 2, FB = F + B, comm = 0.
    fn default() -> Costs {
        Costs::constant(1.0, 1.0, 1.0, 2.0, None, 0.0)
    }
}

impl Costs {
    /// The same costs on every stage.
    pub fn constant(f: f64, i: f64, w: f64, b: f64, fb: Option<f64>, comm: f64) -> Costs {
        Costs {
            default: KindCosts { f, i, w, b, fb },
            per_stage: BTreeMap::new(),
            comm,
        }
    }

    /// Costs of `stage`.
    pub fn stage(&self, stage: usize) -> &KindCosts {
        self.per_stage.get(&stage).unwrap_or(&self.default)
    }

    /// Duration of one action.
    pub fn action(&self, action: &Action) -> f64 {
        match action {
            Action::Op(op) => self.stage(op.stage).of(op.kind),
            Action::OverlapFB { f, b } => {
                let c = self.stage(f.stage);
                c.fb.unwrap_or_else(|| c.f + self.stage(b.stage).of(b.kind))
            }
        }
    }
}

/// Parses `F=1,I=1,W=1,B=2,FB=2.5,comm=0.1,s3.F=2` (keys case-insensitive;
/// missing keys keep their defaults F=I=W=1, B=I+W, FB=F+B, comm=0; `sN.KEY`
/// overrides KEY on stage N only).
impl FromStr for Costs {
    type Err = Error;
    fn from_str(text: &str) -> Result<Costs> {
        let mut global: HashMap<String, f64> = HashMap::new();
        let mut staged: BTreeMap<usize, HashMap<String, f64>> = BTreeMap::new();
        for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let bad = |reason: &str| Error::BadCost {
                entry: entry.into(),
                reason: reason.into(),
            };
            let (key, value) = entry
                .split_once('=')
                .ok_or_else(|| bad("expected KEY=VALUE"))?;
            let value: f64 = value
                .trim()
                .parse()
                .map_err(|_| bad("value must be a number"))?;
            if !(value.is_finite() && value >= 0.0) {
                return Err(bad("value must be finite and >= 0"));
            }
            let key = key.trim().to_ascii_uppercase();
            let (stage, key) = match key.strip_prefix('S').and_then(|k| k.split_once('.')) {
                Some((n, k)) => {
                    let n = n
                        .parse::<usize>()
                        .map_err(|_| bad("stage override is sN.KEY"))?;
                    (Some(n), k.to_string())
                }
                None => (None, key),
            };
            let known = ["F", "I", "W", "B", "FB", "COMM"];
            if !known.contains(&key.as_str()) || (stage.is_some() && key == "COMM") {
                return Err(bad("keys are F, I, W, B, FB, comm and sN.F/I/W/B/FB"));
            }
            match stage {
                Some(n) => staged.entry(n).or_default().insert(key, value),
                None => global.insert(key, value),
            };
        }
        let resolve = |keys: &HashMap<String, f64>, base: Option<&KindCosts>| {
            let get = |k: &str, d: f64| keys.get(k).copied().unwrap_or(d);
            let f = get("F", base.map_or(1.0, |b| b.f));
            let i = get("I", base.map_or(1.0, |b| b.i));
            let w = get("W", base.map_or(1.0, |b| b.w));
            let split_changed = keys.contains_key("I") || keys.contains_key("W");
            let b_default = match base {
                Some(b) if !split_changed => b.b,
                _ => i + w,
            };
            let b = get("B", b_default);
            let fb = keys.get("FB").copied().or(base.and_then(|b| b.fb));
            KindCosts { f, i, w, b, fb }
        };
        let default = resolve(&global, None);
        let per_stage = staged
            .iter()
            .map(|(&s, k)| (s, resolve(k, Some(&default))))
            .collect();
        let comm = global.get("COMM").copied().unwrap_or(0.0);
        Ok(Costs {
            default,
            per_stage,
            comm,
        })
    }
}

/// One action placed in time.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TimedAction {
    /// The action (text form via `Display`).
    pub action: Action,
    /// Start time.
    pub start: f64,
    /// End time.
    pub end: f64,
}

/// Per-rank results.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RankReport {
    /// The rank.
    pub rank: usize,
    /// Time spent computing.
    pub busy: f64,
    /// `makespan − busy`: idle time on this rank.
    pub bubble: f64,
    /// Most stage-chunks of activations alive at once.
    pub peak_activations: usize,
    /// Stages (parameter copies of one stage's size) held.
    pub param_stages: usize,
}

/// The simulated schedule.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Simulation {
    /// `timeline[rank]`: its actions with times, in program order.
    pub timeline: Vec<Vec<TimedAction>>,
    /// End of the last action.
    pub makespan: f64,
    /// `1 − Σ busy / (ranks · makespan)`.
    pub bubble_rate: f64,
    /// Per-rank results.
    pub ranks: Vec<RankReport>,
}

/// Simulates `schedule` under `costs`. Deadlocks are reported as by the validator.
pub fn simulate(schedule: &Schedule, costs: &Costs) -> Result<Simulation> {
    insert_send_recv(schedule)?;
    let topo = Topology::new(schedule);
    let map = &schedule.stage_map;
    let ranks = schedule.ranks();
    let programs: Vec<Vec<Action>> = schedule
        .programs
        .iter()
        .map(|p| p.iter().flatten().copied().collect())
        .collect();
    let mut ended: HashMap<Event, (f64, usize)> = HashMap::new();
    let mut clock = vec![0.0f64; ranks];
    let mut cursor = vec![0usize; ranks];
    let mut timeline: Vec<Vec<TimedAction>> = vec![Vec::new(); ranks];
    loop {
        let mut moved = false;
        for r in 0..ranks {
            while let Some(action) = programs[r].get(cursor[r]) {
                let own: Vec<Event> = action.ops().flat_map(Topology::produces).collect();
                let needs: Vec<Event> = action
                    .ops()
                    .flat_map(|op| topo.needs(op))
                    .filter(|e| !own.contains(e))
                    .collect();
                let Some(ready) = needs.iter().try_fold(clock[r], |t, e| {
                    ended
                        .get(e)
                        .map(|&(end, src)| t.max(end + if src == r { 0.0 } else { costs.comm }))
                }) else {
                    break;
                };
                let end = ready + costs.action(action);
                for op in action.ops() {
                    for e in Topology::produces(op) {
                        ended.insert(e, (end, map.rank(op.stage).unwrap_or(r)));
                    }
                }
                timeline[r].push(TimedAction {
                    action: *action,
                    start: ready,
                    end,
                });
                clock[r] = end;
                cursor[r] += 1;
                moved = true;
            }
        }
        if !moved {
            break;
        }
    }
    // insert_send_recv proved progress, so every action has run.
    debug_assert!((0..ranks).all(|r| cursor[r] == programs[r].len()));
    let makespan = clock.iter().copied().fold(0.0, f64::max);
    let reports: Vec<RankReport> = (0..ranks)
        .map(|r| {
            let busy: f64 = timeline[r].iter().map(|t| t.end - t.start).sum();
            RankReport {
                rank: r,
                busy,
                bubble: makespan - busy,
                peak_activations: peak_activations(&programs[r]),
                param_stages: map.stages_of(r).len(),
            }
        })
        .collect();
    let total_busy: f64 = reports.iter().map(|r| r.busy).sum();
    let bubble_rate = if makespan > 0.0 {
        1.0 - total_busy / (ranks as f64 * makespan)
    } else {
        0.0
    };
    Ok(Simulation {
        timeline,
        makespan,
        bubble_rate,
        ranks: reports,
    })
}

/// Most stage-chunks alive at once on one rank's program (see module doc).
pub fn peak_activations(program: &[Action]) -> usize {
    let mut alive: HashSet<(usize, usize)> = HashSet::new();
    let mut peak = 0;
    for op in program.iter().flat_map(|a| a.ops()) {
        let Op {
            stage,
            kind,
            microbatch: Some(mb),
        } = op
        else {
            continue;
        };
        match kind {
            OpKind::F => {
                alive.insert((stage, mb));
                peak = peak.max(alive.len());
            }
            OpKind::B | OpKind::W => {
                alive.remove(&(stage, mb));
            }
            _ => {}
        }
    }
    peak
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn costs_parse_defaults_overrides_and_errors() {
        let c: Costs = "F=2,W=0.5".parse().unwrap();
        // B defaults to I + W = 1 + 0.5.
        assert_eq!(
            c.default,
            KindCosts {
                f: 2.0,
                i: 1.0,
                w: 0.5,
                b: 1.5,
                fb: None
            }
        );
        let c: Costs = "F=1,B=2,FB=2.5,comm=0.25,s3.F=4".parse().unwrap();
        assert_eq!(c.comm, 0.25);
        assert_eq!(c.stage(3).f, 4.0);
        assert_eq!(c.stage(3).fb, Some(2.5));
        assert_eq!(c.stage(0).f, 1.0);
        for bad in ["F", "F=x", "X=1", "F=-1", "s1.comm=2", "sx.F=1"] {
            let e = bad.parse::<Costs>().unwrap_err();
            assert!(matches!(e, Error::BadCost { .. }), "{bad}: {e}");
        }
    }

    #[test]
    fn overlapped_unit_allocates_before_it_frees() {
        let a: Vec<Action> = ["0F0", "(0F1;0B0)OVERLAP_F_B", "0B1"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(peak_activations(&a), 2);
    }
}
