//! Interleaved-1F1B (VPP) warmup arithmetic and its microbatch regime checks.
//!
//! Megatron's interleaved schedule runs `m·v` micro-steps per rank (one per
//! microbatch and chunk). Rank `r` first runs
//! `warmup(r) = min(2(P−r−1) + (v−1)·g, m·v)` forward micro-steps, `g` being
//! the microbatch group size (P by default), then `m·v − warmup(r)` steady
//! 1F1B pairs, then the same number of cooldown backwards as warmup forwards.
//! The legacy regime (seed `pipeline_residency_schedule.py`) requires
//! `m % P == 0` and rejects the "all-warmup" regime where some rank's warmup
//! covers every micro-step (Megatron silently switches to all-forward-then-
//! all-backward there; we make it an error so memory is never a surprise).

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

/// Warmup and steady micro-step counts of one rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VppWarmup {
    /// The pipeline rank.
    pub rank: usize,
    /// Warmup forward micro-steps before the first backward.
    pub warmup: usize,
    /// Remaining (steady 1F1B) micro-steps: `m·v − warmup`.
    pub remaining: usize,
}

/// `min(2(P−r−1) + (v−1)·group, m·v)`: warmup forward micro-steps of `rank`.
pub fn vpp_warmup(rank: usize, pp: usize, vpp: usize, microbatches: usize, group: usize) -> usize {
    let raw = 2 * (pp - rank - 1) + (vpp.saturating_sub(1)) * group;
    raw.min(microbatches * vpp)
}

/// Legacy regime: `microbatches % pp == 0`.
pub fn check_vpp_microbatches(pp: usize, microbatches: usize) -> Result<()> {
    if pp == 0 {
        return Err(Error::NoRanks { pp });
    }
    if !microbatches.is_multiple_of(pp) {
        return Err(Error::VppMicrobatchesNotDivisible { microbatches, pp });
    }
    Ok(())
}

/// Warmup/remaining counts of every rank (group size P), after the regime
/// checks: `m % P == 0`, and no rank in the all-warmup regime (warmup ≥ m·v).
pub fn vpp_warmup_counts(pp: usize, vpp: usize, microbatches: usize) -> Result<Vec<VppWarmup>> {
    check_vpp_microbatches(pp, microbatches)?;
    if vpp < 2 {
        return Err(Error::VppTooSmall { vpp });
    }
    let total = microbatches * vpp;
    (0..pp)
        .map(|rank| {
            let raw = 2 * (pp - rank - 1) + (vpp - 1) * pp;
            if raw >= total {
                return Err(Error::VppAllWarmup {
                    rank,
                    warmup: raw,
                    total,
                    microbatches,
                    vpp,
                });
            }
            let warmup = vpp_warmup(rank, pp, vpp, microbatches, pp);
            Ok(VppWarmup {
                rank,
                warmup,
                remaining: total - warmup,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vpp_warmup_counts_pp4_vpp2_m8_match_hand_computation() {
        // total = 8·2 = 16; warmup(r) = 2(3−r) + 1·4 = 10, 8, 6, 4; remaining = 16 − warmup.
        let c = vpp_warmup_counts(4, 2, 8).unwrap();
        let got: Vec<(usize, usize)> = c.iter().map(|w| (w.warmup, w.remaining)).collect();
        assert_eq!(got, vec![(10, 6), (8, 8), (6, 10), (4, 12)]);
    }

    #[test]
    fn vpp_warmup_pp2_vpp3_m4_match_hand_computation() {
        // total = 12; warmup(0) = 2·1 + 2·2 = 6, warmup(1) = 0 + 4 = 4.
        let c = vpp_warmup_counts(2, 3, 4).unwrap();
        assert_eq!(
            (c[0].warmup, c[0].remaining, c[1].warmup, c[1].remaining),
            (6, 6, 4, 8)
        );
    }

    #[test]
    fn vpp_warmup_is_clamped_to_total_micro_steps() {
        // 2·3 + 1·4 = 10 > 4·2 = 8 → 8.
        assert_eq!(vpp_warmup(0, 4, 2, 4, 4), 8);
    }

    #[test]
    fn vpp_microbatches_not_multiple_of_pp_is_rejected() {
        let e = vpp_warmup_counts(4, 2, 6).unwrap_err();
        assert_eq!(
            e,
            Error::VppMicrobatchesNotDivisible {
                microbatches: 6,
                pp: 4
            }
        );
        assert!(e
            .to_string()
            .contains("microbatches=6 must be a multiple of pp=4"));
    }

    #[test]
    fn vpp_all_warmup_regime_is_rejected() {
        // m = P = 4, v = 2: rank 0 warmup 2·3 + 4 = 10 >= 8 micro-steps.
        let e = vpp_warmup_counts(4, 2, 4).unwrap_err();
        assert_eq!(
            e,
            Error::VppAllWarmup {
                rank: 0,
                warmup: 10,
                total: 8,
                microbatches: 4,
                vpp: 2
            }
        );
        assert!(e.to_string().contains("all-warmup"));
    }
}
