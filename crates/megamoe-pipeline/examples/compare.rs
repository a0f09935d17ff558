//! Prints, for each kind, validation status, makespan, per-rank bubble and
//! peak activations under the costs given as the first argument.
//!
//! `cargo run -p megamoe-pipeline --example compare -- "F=1,I=1,W=1,B=2" 4 8`

use megamoe_pipeline::{generate, simulate, validate, Costs, PipelineShape};
use megamoe_plan::ScheduleKind;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let costs: Costs = args
        .get(1)
        .map_or("", |s| s.as_str())
        .parse()
        .expect("costs");
    let ranks = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(4);
    let microbatches = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(8);
    for kind in ScheduleKind::ALL {
        let shape = PipelineShape {
            ranks,
            microbatches,
            vpp: 2,
        };
        let s = match generate(kind, shape) {
            Ok(s) => s,
            Err(e) => {
                println!("{kind:12} {e}");
                continue;
            }
        };
        if let Err(e) = validate(&s) {
            println!("{kind:12} INVALID {e}");
            continue;
        }
        let sim = simulate(&s, &costs).expect("simulate");
        let bubbles: Vec<f64> = sim.ranks.iter().map(|r| r.bubble).collect();
        let acts: Vec<usize> = sim.ranks.iter().map(|r| r.peak_activations).collect();
        println!(
            "{kind:12} makespan {:7.2} rate {:.3} bubble {bubbles:?} act {acts:?}",
            sim.makespan, sim.bubble_rate
        );
    }
    assert!(ranks > 0);
}
