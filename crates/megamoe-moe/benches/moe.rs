//! MoE layer benchmarks (filled below).
fn main() {}
