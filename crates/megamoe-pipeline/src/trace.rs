//! Chrome / Perfetto trace JSON of a simulated schedule: one process (row)
//! per rank, one complete ("X") slice per action, coloured by kind through
//! the trace viewer's reserved `cname` colours. One cost unit = 1 ms.

use crate::ir::{Action, OpKind};
use crate::simulate::Simulation;
use serde_json::{json, Value};

/// Trace-viewer colour of an action (F blue, I green, W yellow, B red, F&B purple).
pub fn colour_name(action: &Action) -> &'static str {
    match action {
        Action::OverlapFB { .. } => "rail_animation",
        Action::Op(op) => match op.kind {
            OpKind::F => "rail_response",
            OpKind::I => "good",
            OpKind::W => "yellow",
            OpKind::B => "terrible",
            _ => "grey",
        },
    }
}

fn category(action: &Action) -> &'static str {
    match action {
        Action::OverlapFB { .. } => "OVERLAP_F_B",
        Action::Op(op) => op.kind.name(),
    }
}

/// The trace as a JSON value with a `traceEvents` array (`title` names the process group).
pub fn chrome_trace(sim: &Simulation, title: &str) -> Value {
    const US_PER_UNIT: f64 = 1000.0;
    let mut events = Vec::new();
    for (rank, row) in sim.timeline.iter().enumerate() {
        events.push(json!({
            "name": "process_name", "ph": "M", "pid": rank, "tid": 0,
            "args": { "name": format!("rank {rank}") }
        }));
        events.push(json!({
            "name": "process_sort_index", "ph": "M", "pid": rank, "tid": 0,
            "args": { "sort_index": rank }
        }));
        for t in row {
            let ops: Vec<Value> = t
                .action
                .ops()
                .map(|o| json!({ "stage": o.stage, "kind": o.kind.name(), "microbatch": o.microbatch }))
                .collect();
            events.push(json!({
                "name": t.action.to_string(),
                "cat": category(&t.action),
                "ph": "X",
                "ts": t.start * US_PER_UNIT,
                "dur": (t.end - t.start) * US_PER_UNIT,
                "pid": rank,
                "tid": 0,
                "cname": colour_name(&t.action),
                "args": { "ops": ops, "start": t.start, "end": t.end }
            }));
        }
    }
    json!({
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": { "title": title, "makespan": sim.makespan, "bubble_rate": sim.bubble_rate }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{generate, simulate, Costs, PipelineShape};
    use megamoe_plan::ScheduleKind;

    #[test]
    fn chrome_trace_has_one_slice_per_action_and_one_row_per_rank() {
        let s = generate(
            ScheduleKind::OneFOneB,
            PipelineShape {
                ranks: 2,
                microbatches: 2,
                vpp: 1,
            },
        )
        .unwrap();
        let sim = simulate(&s, &Costs::default()).unwrap();
        let v = chrome_trace(&sim, "1f1b");
        let events = v["traceEvents"].as_array().unwrap();
        let slices: Vec<&Value> = events.iter().filter(|e| e["ph"] == "X").collect();
        // 2 ranks × (2 F + 2 B).
        assert_eq!(slices.len(), 8);
        let names = events
            .iter()
            .filter(|e| e["name"] == "process_name")
            .count();
        assert_eq!(names, 2);
        let b = slices.iter().find(|e| e["name"] == "1B0").unwrap();
        // 1F0 runs [1, 2), 1B0 [2, 4): B costs 2 units = 2000 µs.
        assert_eq!(
            (b["ts"].as_f64(), b["dur"].as_f64()),
            (Some(2000.0), Some(2000.0))
        );
        assert_eq!(b["cname"], "terrible");
    }
}
