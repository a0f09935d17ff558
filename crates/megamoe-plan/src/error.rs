//! The errors of planning: every bad config, override or layout is one variant
//! that names the field, the value and the rule, in one line.

/// `Result` with [`PlanError`].
pub type Result<T> = std::result::Result<T, PlanError>;

/// A config, override or layout problem found before any work starts.
///
/// Every message is one line of the form `<field>=<value> <rule>`, so the CLI
/// prints it as `error: <message>` and exits 2.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum PlanError {
    // ---------------------------------------------------------------- loading
    /// The config file could not be read.
    #[error("cannot read config {path}: {message}")]
    Io {
        /// The path given.
        path: String,
        /// The operating system's message.
        message: String,
    },
    /// TOML syntax error, unknown key, wrong type or missing key in the file.
    #[error("config line {line}: `{key}`: {message}")]
    Toml {
        /// 1-based line of the offending key or value.
        line: usize,
        /// `section.key` (or the section, or `?` when the parser gives no place).
        key: String,
        /// The parser's message (e.g. "unknown field `foo`, expected one of ...").
        message: String,
    },
    /// A `--set` argument that is not `section.key=value`.
    #[error("--set {arg:?} is malformed: {rule}")]
    BadOverride {
        /// The argument as given.
        arg: String,
        /// What is wrong with it.
        rule: &'static str,
    },
    /// A `--set` override that the config schema rejects (unknown key, wrong type).
    #[error("--set {arg}: {message}")]
    OverrideRejected {
        /// The argument as given.
        arg: String,
        /// The deserialiser's message.
        message: String,
    },

    // ------------------------------------------------------- generic rules
    /// A single value outside its valid range or set.
    #[error("{field}={value} is invalid: {rule}")]
    Invalid {
        /// `section.key`.
        field: &'static str,
        /// The value as written.
        value: String,
        /// The rule it breaks.
        rule: &'static str,
    },
    /// `field` must be a multiple of `divisor_field`.
    #[error("{field}={value} must be divisible by {divisor_field}={divisor}")]
    NotDivisible {
        /// `section.key` of the dividend.
        field: &'static str,
        /// Its value.
        value: usize,
        /// `section.key` (or a derived quantity) of the divisor.
        divisor_field: &'static str,
        /// Its value.
        divisor: usize,
    },

    // ------------------------------------------------------------- model / TP
    /// `model.n_heads % parallel.tp != 0`.
    #[error("parallel.tp={tp} must divide model.n_heads={n_heads} (each TP rank holds whole attention heads)")]
    HeadsNotDivisibleByTp {
        /// model.n_heads.
        n_heads: usize,
        /// parallel.tp.
        tp: usize,
    },
    /// `model.n_kv_heads % parallel.tp != 0`.
    #[error("parallel.tp={tp} must divide model.n_kv_heads={n_kv_heads} (each TP rank holds whole KV heads)")]
    KvHeadsNotDivisibleByTp {
        /// model.n_kv_heads.
        n_kv_heads: usize,
        /// parallel.tp.
        tp: usize,
    },

    /// A stage → rank map that puts a stage past the last rank.
    #[error("stage map: stage {stage} on rank {rank}, but there are only {ranks} ranks")]
    StageRankOutOfRange {
        /// The schedule stage.
        stage: usize,
        /// The rank it names.
        rank: usize,
        /// Ranks available.
        ranks: usize,
    },
    // -------------------------------------------------------------------- MoE
    /// `moe.routed_experts % parallel.ep != 0`.
    #[error("parallel.ep={ep} must divide moe.routed_experts={routed_experts} (each EP rank holds routed_experts/ep experts)")]
    ExpertsNotDivisibleByEp {
        /// moe.routed_experts.
        routed_experts: usize,
        /// parallel.ep.
        ep: usize,
    },
    /// `parallel.ep > 1` on a dense model.
    #[error("parallel.ep={ep} needs MoE enabled ([moe] routed_experts >= 1); this model is dense")]
    EpWithoutMoe {
        /// parallel.ep.
        ep: usize,
    },
    /// `moe.null_rho` outside (0, 1].
    #[error("moe.null_rho={null_rho} must be in (0, 1] (1 = null slots off)")]
    NullRhoOutOfRange {
        /// moe.null_rho.
        null_rho: f64,
    },
    /// `moe.top_k > moe.routed_experts` (or 0).
    #[error("moe.top_k={top_k} must be in 1..=moe.routed_experts={routed_experts}")]
    TopKExceedsExperts {
        /// moe.top_k.
        top_k: usize,
        /// moe.routed_experts.
        routed_experts: usize,
    },
    /// `moe.routed_experts % moe.n_groups != 0`.
    #[error("moe.n_groups={n_groups} must divide moe.routed_experts={routed_experts} (equal expert groups)")]
    GroupsNotDividingExperts {
        /// moe.n_groups.
        n_groups: usize,
        /// moe.routed_experts.
        routed_experts: usize,
    },
    /// `moe.topk_groups` not in 1..=n_groups.
    #[error("moe.topk_groups={topk_groups} must be in 1..=moe.n_groups={n_groups}")]
    TopkGroupsExceedsGroups {
        /// moe.topk_groups.
        topk_groups: usize,
        /// moe.n_groups.
        n_groups: usize,
    },
    /// The kept groups hold fewer experts than `top_k`.
    #[error("moe.topk_groups={topk_groups} groups of {experts_per_group} experts hold fewer than moe.top_k={top_k} experts")]
    GroupsTooFewExperts {
        /// moe.topk_groups.
        topk_groups: usize,
        /// routed_experts / n_groups.
        experts_per_group: usize,
        /// moe.top_k.
        top_k: usize,
    },
    /// Group-limited routing together with null slots.
    #[error("moe.n_groups={n_groups} (group routing) cannot be combined with moe.null_rho={null_rho} (null slots)")]
    GroupRoutingWithNullSlots {
        /// moe.n_groups.
        n_groups: usize,
        /// moe.null_rho.
        null_rho: f64,
    },
    /// No layer of the model is an MoE layer although `[moe]` is enabled.
    #[error("moe.first_dense_layers={first_dense_layers} and moe.layer_freq={layer_freq} leave no MoE layer among model.n_layers={n_layers}")]
    NoMoeLayers {
        /// model.n_layers.
        n_layers: usize,
        /// moe.first_dense_layers.
        first_dense_layers: usize,
        /// moe.layer_freq.
        layer_freq: usize,
    },

    // --------------------------------------------------------------- pipeline
    /// Layers do not split evenly into the schedule's pipeline stages.
    #[error("model.n_layers={n_layers} must be divisible by the {stages} pipeline stages of schedule {schedule} (parallel.pp={pp}, {stages_per_rank} stage(s) per rank)")]
    LayersNotDivisibleByStages {
        /// model.n_layers.
        n_layers: usize,
        /// Distinct pipeline stages.
        stages: usize,
        /// parallel.pp.
        pp: usize,
        /// Stages held by one rank.
        stages_per_rank: usize,
        /// The schedule.
        schedule: crate::ScheduleKind,
    },
    /// DualPipe needs an even number of pipeline ranks.
    #[error("parallel.pp={pp} must be even for schedule {schedule} (ranks r and pp-1-r mirror each other)")]
    DualPipeOddPp {
        /// parallel.pp.
        pp: usize,
        /// The schedule.
        schedule: crate::ScheduleKind,
    },
    /// Too few microbatches for the schedule.
    #[error(
        "parallel.microbatches={microbatches} must be >= {min} ({reason}) for schedule {schedule}"
    )]
    TooFewMicrobatches {
        /// parallel.microbatches.
        microbatches: usize,
        /// The minimum.
        min: usize,
        /// How the minimum follows from pp (e.g. "2·parallel.pp").
        reason: &'static str,
        /// The schedule.
        schedule: crate::ScheduleKind,
    },
    /// DualPipe needs an even number of microbatches (half enter at each end).
    #[error("parallel.microbatches={microbatches} must be even for schedule {schedule} (half enter at each end)")]
    OddMicrobatches {
        /// parallel.microbatches.
        microbatches: usize,
        /// The schedule.
        schedule: crate::ScheduleKind,
    },
    /// Interleaved 1F1B: microbatches must be a multiple of pp (legacy constraint).
    #[error("parallel.microbatches={microbatches} must be divisible by parallel.pp={pp} for schedule interleaved")]
    InterleavedMicrobatches {
        /// parallel.microbatches.
        microbatches: usize,
        /// parallel.pp.
        pp: usize,
    },
    /// Interleaved 1F1B whose rank 0 warmup covers every micro-step.
    #[error("schedule interleaved is in the all-warmup regime: rank 0 warmup {warmup} >= {total} micro-steps (parallel.microbatches={microbatches} x parallel.vpp={vpp}); raise microbatches")]
    AllWarmupRegime {
        /// Warmup micro-steps of rank 0.
        warmup: usize,
        /// microbatches·vpp.
        total: usize,
        /// parallel.microbatches.
        microbatches: usize,
        /// parallel.vpp.
        vpp: usize,
    },
    /// `parallel.vpp` used with a schedule that has one chunk per rank, or interleaved with vpp < 2.
    #[error("parallel.vpp={vpp} does not fit schedule {schedule}: {rule}")]
    VppMismatch {
        /// parallel.vpp.
        vpp: usize,
        /// The schedule.
        schedule: crate::ScheduleKind,
        /// The rule.
        rule: &'static str,
    },

    // ------------------------------------------------------------ mesh, batch
    /// The mesh product differs from the device count.
    #[error("world size {world} (parallel.pp={pp} x dp={dp} x ep={ep} x cp={cp} x tp={tp}) must equal --devices={devices}")]
    WorldMismatch {
        /// pp·dp·ep·cp·tp.
        world: usize,
        /// The device count given.
        devices: usize,
        /// parallel.pp.
        pp: usize,
        /// parallel.dp.
        dp: usize,
        /// parallel.ep.
        ep: usize,
        /// parallel.cp.
        cp: usize,
        /// parallel.tp.
        tp: usize,
    },
    /// global_batch / (dp·ep·microbatches) is not a positive integer.
    #[error("train.global_batch={global_batch} must be divisible by parallel.dp={dp} x parallel.ep={ep} x parallel.microbatches={microbatches} = {divisor} (micro-batch size per rank must be a positive integer)")]
    MicroBatchNotInteger {
        /// train.global_batch.
        global_batch: usize,
        /// parallel.dp.
        dp: usize,
        /// parallel.ep.
        ep: usize,
        /// parallel.microbatches.
        microbatches: usize,
        /// dp·ep·microbatches.
        divisor: usize,
    },

    /// The learning-rate warmup is longer than the run.
    #[error("optim.warmup_steps={warmup_steps} must be <= train.steps={steps} (the run would end before the learning rate is warm)")]
    WarmupExceedsSteps {
        /// optim.warmup_steps.
        warmup_steps: usize,
        /// train.steps.
        steps: usize,
    },
    /// A size product that does not fit in 64 bits (e.g. dp = 2^62 with a
    /// batch of 2^62 sequences).
    #[error("{what} = {expr} overflows 64 bits; use smaller sizes")]
    SizeOverflow {
        /// The derived quantity, e.g. "world size".
        what: &'static str,
        /// Its factors with their fields and values.
        expr: String,
    },
    /// The mesh has more ranks than the planner lists.
    #[error("world size {world} (parallel.pp x dp x ep x cp x tp) exceeds the planner's limit of {max} ranks")]
    WorldTooLarge {
        /// pp·dp·ep·cp·tp.
        world: usize,
        /// [`crate::bounds::MAX_WORLD`].
        max: usize,
    },
    /// One rank's share of the parameters plus its largest transient tensor is
    /// more than the memory it runs on (see [`crate::bounds`]).
    #[error("too big for memory: a rank needs at least {need}, more than {limit} ({origin}); biggest: {term} = {term_bytes}")]
    ExceedsMemory {
        /// The biggest term, naming its fields.
        term: &'static str,
        /// Its bytes, human-readable.
        term_bytes: String,
        /// The whole lower bound, human-readable.
        need: String,
        /// The memory limit, human-readable.
        limit: String,
        /// Where the limit comes from.
        origin: String,
    },

    // ------------------------------------------------------------- shard math
    /// The local row count differs from the seed's `even` shard length.
    #[error(
        "local shard mismatch: expected local_rows={local_rows}, got shard length={shard_len}"
    )]
    LocalShardMismatch {
        /// Rows the caller holds.
        local_rows: usize,
        /// Rows `shard0_bounds` gives this rank.
        shard_len: usize,
    },
}
