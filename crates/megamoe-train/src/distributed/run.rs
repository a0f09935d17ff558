//! Launching ranks: [`run_thread_ranks`] runs a closure on every thread rank of one
//! process; [`follow_training`] is the loop of a rank other than 0, which makes the same
//! collective calls as rank 0's [`run_training`](crate::session::run_training) (steps, evals,
//! checkpoint gathers, the final sample) and writes nothing.

use megamoe_comm::{Communicator, RankFailures, ThreadWorld};

use crate::error::{Error, Result};
use crate::session::RunOptions;
use crate::trainer::Trainer;

/// Environment variable injecting a fault into one thread rank of `train --world N`:
/// `MEGAMOE_RANK_FAULT=<rank>@<step>` makes that rank fail with
/// [`Error::InjectedRankFault`] when it is about to run step `step` (1-based), as a rank
/// that dies would; every other rank then stops with an error naming it. Any rank may be
/// named, the writing rank 0 included ([`Trainer::set_rank_fault`] arms it).
pub const RANK_FAULT_ENV: &str = "MEGAMOE_RANK_FAULT";

/// Runs `f` on `world` thread ranks of this process (rank `r` gets the world communicator
/// as rank `r`) and returns their results by rank, or every failed rank's message with
/// the first failure (the cause) named. A rank that fails makes the others' collectives
/// fail instead of hanging.
pub fn run_thread_ranks<T, F>(world: usize, f: F) -> std::result::Result<Vec<T>, RankFailures>
where
    T: Send,
    F: Fn(Box<dyn Communicator>) -> Result<T> + Sync,
{
    let w = ThreadWorld::new(world).map_err(|e| RankFailures {
        world,
        first: (0, e.to_string()),
        failures: vec![(0, e.to_string())],
    })?;
    w.run(|comm| f(Box::new(comm)))
}

/// The fault [`RANK_FAULT_ENV`] asks for, as (rank, step); `None` when unset. A malformed
/// value is an error naming the variable.
pub fn rank_fault_from_env() -> Result<Option<(usize, u64)>> {
    let Ok(spec) = std::env::var(RANK_FAULT_ENV) else {
        return Ok(None);
    };
    let parsed = spec
        .split_once('@')
        .and_then(|(r, s)| Some((r.parse::<usize>().ok()?, s.parse::<u64>().ok()?)));
    parsed.map(Some).ok_or(Error::TrainConfig {
        field: RANK_FAULT_ENV,
        value: spec,
        rule: "must be <rank>@<step>, e.g. 1@3".to_string(),
    })
}

/// Fails with [`Error::InjectedRankFault`] if `fault` names this rank and its next step.
pub fn check_rank_fault(trainer: &Trainer, fault: Option<(usize, u64)>) -> Result<()> {
    let rank = trainer.parallel().map_or(0, |p| p.rank());
    let next = trainer.step_count() + 1;
    match fault {
        Some((r, s)) if r == rank && s == next => {
            Err(Error::InjectedRankFault { rank, step: next })
        }
        _ => Ok(()),
    }
}

/// The loop of a non-writing rank of a fresh or resumed run: the same steps,
/// evaluations, checkpoint gathers and final sample as
/// [`run_training`](crate::session::run_training) runs on rank 0 (so every collective
/// of the MoE exchanges and gradient reduces is matched), writing nothing. `fault` is an
/// injected failure (see [`RANK_FAULT_ENV`]).
pub fn follow_training(
    trainer: &mut Trainer,
    opts: &RunOptions,
    fault: Option<(usize, u64)>,
) -> Result<()> {
    let start = trainer.step_count();
    let plan = trainer.plan().clone();
    let every = |period: Option<usize>, step: u64| {
        period.is_some_and(|p| p > 0 && step.is_multiple_of(p as u64))
    };
    let mut evaluated_at = None;
    while trainer.step_count() < opts.total_steps {
        check_rank_fault(trainer, fault)?;
        let m = trainer.step()?;
        trainer.check_guard()?;
        if every(plan.train.eval_every, m.step) {
            trainer.evaluate()?;
            evaluated_at = Some(m.step);
        }
        if every(plan.train.checkpoint_every, m.step) && m.step < opts.total_steps {
            trainer.join_checkpoint()?;
        }
    }
    let step = trainer.step_count();
    if plan.train.eval_every.is_some() && evaluated_at != Some(step) && step > start {
        trainer.evaluate()?;
    }
    if opts.sample_tokens > 0 {
        let prompt = crate::session::sample_prompt(trainer);
        trainer.sample(&prompt, opts.sample_tokens)?;
    }
    // The final checkpoint (rank 0 saves one at the last step: a resume retired any later
    // checkpoint, and a run already at its last step stops before the ranks start).
    trainer.join_checkpoint()?;
    Ok(())
}
