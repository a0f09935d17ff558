//! The crate's one error type: every user-reachable problem is a variant that
//! names the field, the value and the rule it broke.

use megamoe_plan::ScheduleKind;

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// One rank that cannot make progress in the lockstep dry run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StuckRank {
    /// The rank.
    pub rank: usize,
    /// The action it is blocked on, in the compute-only text form.
    pub action: String,
    /// The actions it waits for that have not run yet (text form).
    pub waiting_for: Vec<String>,
}

impl std::fmt::Display for StuckRank {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "rank {} at {} waits for [{}]",
            self.rank,
            self.action,
            self.waiting_for.join(" ")
        )
    }
}

fn join_stuck(stuck: &[StuckRank]) -> String {
    stuck
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

/// Everything that can go wrong while building, parsing, checking or
/// simulating a pipeline schedule.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    // ---- generator preconditions -------------------------------------------------
    /// The pipeline needs at least one rank.
    #[error("pp={pp} must be at least 1")]
    NoRanks {
        /// The rank count given.
        pp: usize,
    },
    /// Not enough microbatches for the schedule.
    #[error("{kind}: microbatches={microbatches} must be >= {min} ({rule})")]
    TooFewMicrobatches {
        /// The schedule.
        kind: ScheduleKind,
        /// The microbatch count given.
        microbatches: usize,
        /// The smallest valid count.
        min: usize,
        /// The rule, e.g. "m >= 2*pp".
        rule: &'static str,
    },
    /// DualPipe needs an even number of ranks.
    #[error("{kind}: pp={pp} must be even (stage r and its mirror P-1-r share a rank)")]
    OddRanks {
        /// The schedule.
        kind: ScheduleKind,
        /// The rank count given.
        pp: usize,
    },
    /// DualPipe splits the microbatches evenly between its two directions.
    #[error("{kind}: microbatches={microbatches} must be even (half enter at each end)")]
    OddMicrobatches {
        /// The schedule.
        kind: ScheduleKind,
        /// The microbatch count given.
        microbatches: usize,
    },
    /// Interleaved 1F1B needs at least two chunks per rank.
    #[error("interleaved: vpp={vpp} must be >= 2 (use 1f1b for one chunk per rank)")]
    VppTooSmall {
        /// The chunk count given.
        vpp: usize,
    },
    /// Legacy VPP regime: the microbatches must divide evenly into rank groups.
    #[error("interleaved: microbatches={microbatches} must be a multiple of pp={pp} (microbatch % pp == 0)")]
    VppMicrobatchesNotDivisible {
        /// The microbatch count given.
        microbatches: usize,
        /// The rank count given.
        pp: usize,
    },
    /// VPP all-warmup regime: a rank would only run warmup forwards.
    #[error("interleaved: rank {rank} warmup={warmup} >= total micro-steps={total} (microbatches={microbatches}*vpp={vpp}): all-warmup regime; use more microbatches")]
    VppAllWarmup {
        /// The rank whose warmup covers everything.
        rank: usize,
        /// Its warmup micro-steps 2(P-r-1)+(v-1)P.
        warmup: usize,
        /// Micro-steps in total (m*v).
        total: usize,
        /// Microbatches given.
        microbatches: usize,
        /// Chunks per rank given.
        vpp: usize,
    },
    /// Explicit DualPipeV stage boundaries give the wrong number of stages.
    #[error(
        "dualpipev: explicit stage boundaries give {got} stages but pp={pp} needs 2*pp={expected}"
    )]
    StageCountMismatch {
        /// Pipeline ranks.
        pp: usize,
        /// Expected stages (2*pp).
        expected: usize,
        /// Stages the boundaries describe.
        got: usize,
    },
    /// An aux-loss scale input below 1.
    #[error("aux-loss scale: {field}={value} must be >= 1")]
    AuxScaleInput {
        /// `grad_accum_steps` or `num_chunks`.
        field: &'static str,
        /// The value given.
        value: usize,
    },

    // ---- text form and maps ------------------------------------------------------
    /// An action string that is not in PyTorch's compute-only form.
    #[error("cannot parse action {text:?}: {reason}")]
    ParseAction {
        /// The text.
        text: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// A stage map the planner rejects (e.g. a stage on a missing rank).
    #[error("{0}")]
    Plan(#[from] megamoe_plan::PlanError),
    /// A per-kind cost that is not a non-negative number, or an unknown key.
    #[error("costs: {entry:?}: {reason}")]
    BadCost {
        /// The `KEY=VALUE` entry.
        entry: String,
        /// What is wrong.
        reason: String,
    },

    // ---- validation ----------------------------------------------------------------
    /// An action names a stage that no pipeline chain contains.
    #[error(
        "rank {rank}: action {action} names stage {stage}, but the schedule has {stages} stages"
    )]
    UnknownStage {
        /// Rank holding the action.
        rank: usize,
        /// The action text.
        action: String,
        /// The stage.
        stage: usize,
        /// Stage count.
        stages: usize,
    },
    /// A stage's action runs on a rank that does not hold the stage.
    #[error("stage {stage} belongs to rank {expected_rank} but {action} runs on rank {rank} (each stage on exactly one rank)")]
    StageOnWrongRank {
        /// The stage.
        stage: usize,
        /// Rank that holds it.
        expected_rank: usize,
        /// Rank the action is on.
        rank: usize,
        /// The action text.
        action: String,
    },
    /// A compute action without a microbatch, or with one outside its chain.
    #[error("rank {rank}: {action}: microbatch must be in {lo}..{hi} for stage {stage}")]
    BadMicrobatch {
        /// Rank holding the action.
        rank: usize,
        /// The action text.
        action: String,
        /// The stage.
        stage: usize,
        /// First valid microbatch.
        lo: usize,
        /// One past the last valid microbatch.
        hi: usize,
    },
    /// A per-stage count rule is broken.
    #[error("stage {stage}: {rule} (found F={f}, I={i}, W={w}, B={b}, microbatches={m})")]
    StageCount {
        /// The stage.
        stage: usize,
        /// The rule broken.
        rule: &'static str,
        /// Forward count.
        f: usize,
        /// Backward-input count.
        i: usize,
        /// Backward-weight count.
        w: usize,
        /// Full-backward count.
        b: usize,
        /// Microbatches of the stage's chain.
        m: usize,
    },
    /// An action occurs twice, or runs before the action it needs on the same stage.
    #[error("stage {stage} microbatch {microbatch}: {rule}")]
    Ordering {
        /// The stage.
        stage: usize,
        /// The microbatch.
        microbatch: usize,
        /// The rule broken.
        rule: String,
    },
    /// A rank receives messages from a peer in another order than the peer
    /// sends them (a tagless channel would hand a tensor to the wrong op).
    #[error("message order: rank {src} -> rank {dst}, message {position}: sent {sent}, received {received}")]
    MessageOrder {
        /// Sending rank.
        src: usize,
        /// Receiving rank.
        dst: usize,
        /// Index in the pair's message sequence.
        position: usize,
        /// What the sender sends there.
        sent: String,
        /// What the receiver expects there.
        received: String,
    },
    /// The lockstep dry run stopped before every action ran.
    #[error("schedule is not progressing: {}", join_stuck(.stuck))]
    NotProgressing {
        /// The ranks that still have actions, with what they wait for.
        stuck: Vec<StuckRank>,
    },
}
