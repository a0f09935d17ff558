//! The pipeline schedule names of the `[parallel] schedule` key.
//!
//! The names are the config's (and the `megamoe schedule --kind` flag's); the
//! pipeline crate generates the action lists for each kind.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A pipeline schedule, as named in `[parallel] schedule`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ScheduleKind {
    /// All forwards, then all backwards.
    #[serde(rename = "gpipe")]
    GPipe,
    /// One forward one backward (PipeDream-flush).
    #[serde(rename = "1f1b")]
    OneFOneB,
    /// Interleaved 1F1B with `vpp` model chunks per rank (Megatron VPP).
    #[serde(rename = "interleaved")]
    Interleaved,
    /// Zero-bubble H1: backward split into I and W, one stage per rank.
    #[serde(rename = "zb-h1")]
    ZbH1,
    /// Zero-bubble V: two stages per rank on a V map.
    #[serde(rename = "zbv")]
    Zbv,
    /// DualPipe: bidirectional, two mirrored stages per rank.
    #[serde(rename = "dualpipe")]
    DualPipe,
    /// DualPipeV: DualPipe folded on a V map (2P stages on P ranks).
    #[serde(rename = "dualpipev")]
    DualPipeV,
}

impl ScheduleKind {
    /// Every kind, in the order `megamoe schedule --compare` prints them.
    pub const ALL: [ScheduleKind; 7] = [
        ScheduleKind::GPipe,
        ScheduleKind::OneFOneB,
        ScheduleKind::Interleaved,
        ScheduleKind::ZbH1,
        ScheduleKind::Zbv,
        ScheduleKind::DualPipe,
        ScheduleKind::DualPipeV,
    ];

    /// The config name of this kind (`"1f1b"`, `"dualpipev"`, ...).
    pub fn name(self) -> &'static str {
        match self {
            ScheduleKind::GPipe => "gpipe",
            ScheduleKind::OneFOneB => "1f1b",
            ScheduleKind::Interleaved => "interleaved",
            ScheduleKind::ZbH1 => "zb-h1",
            ScheduleKind::Zbv => "zbv",
            ScheduleKind::DualPipe => "dualpipe",
            ScheduleKind::DualPipeV => "dualpipev",
        }
    }

    /// Pipeline stages held by each rank (2 for the V and DualPipe kinds, `vpp` for interleaved).
    pub fn stages_per_rank(self, vpp: usize) -> usize {
        match self {
            ScheduleKind::GPipe | ScheduleKind::OneFOneB | ScheduleKind::ZbH1 => 1,
            ScheduleKind::Interleaved => vpp,
            ScheduleKind::Zbv | ScheduleKind::DualPipe | ScheduleKind::DualPipeV => 2,
        }
    }
}

impl fmt::Display for ScheduleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An unknown schedule name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown schedule {name:?}: expected one of gpipe, 1f1b, interleaved, zb-h1, zbv, dualpipe, dualpipev")]
pub struct UnknownSchedule {
    /// The name that was given.
    pub name: String,
}

impl FromStr for ScheduleKind {
    type Err = UnknownSchedule;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ScheduleKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| UnknownSchedule {
                name: s.to_string(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_names_round_trip_through_from_str() {
        for k in ScheduleKind::ALL {
            assert_eq!(k.name().parse::<ScheduleKind>(), Ok(k));
        }
        assert!("2f2b".parse::<ScheduleKind>().is_err());
    }
}
