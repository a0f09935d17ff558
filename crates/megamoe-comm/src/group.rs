//! [`GroupTable`]: the sub-communicators of one rank, built once, looked up by kind.
//!
//! The kinds and their members come from the caller (the trainer maps megamoe-plan's `Mesh`
//! groups: tensor-, pipeline-, data-, expert-parallel); this crate only builds and holds them.

use std::fmt::Debug;

use crate::communicator::Communicator;
use crate::error::{CommError, Result};

/// This rank's sub-communicators, one per group kind `K`.
pub struct GroupTable<K> {
    groups: Vec<(K, Box<dyn Communicator>)>,
}

impl<K: Copy + Eq + Debug> GroupTable<K> {
    /// Builds one sub-communicator per kind, in the order of `kinds` (collective over `world`:
    /// every rank passes the same `kinds`). `members(kind)` gives the world ranks of this rank's
    /// group of that kind, in the group's rank order.
    pub fn build(
        world: &dyn Communicator,
        kinds: &[K],
        members: impl Fn(K) -> Vec<usize>,
    ) -> Result<GroupTable<K>> {
        let mut groups = Vec::with_capacity(kinds.len());
        for &kind in kinds {
            let world_ranks = members(kind);
            let local =
                world_ranks
                    .iter()
                    .map(|w| {
                        world.members().iter().position(|m| m == w).ok_or(
                            CommError::InvalidArgument {
                                op: "GroupTable::build",
                                arg: "members",
                                value: format!("{kind:?}: {world_ranks:?}"),
                                rule: "every member must be a rank of the world communicator",
                            },
                        )
                    })
                    .collect::<Result<Vec<_>>>()?;
            groups.push((kind, world.split(&local)?));
        }
        Ok(GroupTable { groups })
    }

    /// The communicator of `kind`.
    pub fn get(&self, kind: K) -> Result<&dyn Communicator> {
        self.groups
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, c)| c.as_ref())
            .ok_or(CommError::InvalidArgument {
                op: "GroupTable::get",
                arg: "kind",
                value: format!("{kind:?}"),
                rule: "was not among the kinds the table was built with",
            })
    }

    /// The kinds held, in build order.
    pub fn kinds(&self) -> Vec<K> {
        self.groups.iter().map(|(k, _)| *k).collect()
    }
}

impl<K: Debug> Debug for GroupTable<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut m = f.debug_map();
        for (k, c) in &self.groups {
            m.entry(k, &c.members());
        }
        m.finish()
    }
}
