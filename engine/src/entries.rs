//! The archive's entries, read from the log rather than held by the fold.
//!
//! Which items the archive holds is a fact of the log: every `ItemWritten` of a finished block's
//! last attempt. The fold used to keep those writes in a table for the whole backup (~56 bytes an
//! item, ~60 MB at a million objects, alive through the write phase and the archive build); it now
//! keeps only each finished block's count, and the shell goes through the log's events once when
//! the archive is built, sorting the writes [`final_write`] keeps on disk (an item a block wrote
//! twice is its latest write there). [`final_write`] is the one rule of which writes count, shared
//! with the resource list; [`Versions`] gives each item's preferred version.

use crate::event::Event;
use crate::item::{GroupResource, ItemKey};
use crate::mutation::{self, Mutation};
use crate::state::BackupState;

/// The write `e` records, if it is one the archive holds: an `ItemWritten` of block `block`'s
/// last attempt, the block finished (in `s`, the state folded from the whole log). Gives the
/// block, the key and the digest.
pub fn final_write<'e>(s: &BackupState, e: &'e Event) -> Option<(u32, &'e ItemKey, &'e [u8; 32])> {
    let Event::ItemWritten { block, attempt, key, digest, .. } = e else { return None };
    let b = s.blocks.get(*block as usize)?;
    let last = b.attempts == *attempt || mutation::active(Mutation::ArchiveKeepsEarlierAttempts);
    (b.outcome.is_some() && last).then_some((*block, key, digest))
}

/// Each served type's preferred version (the archive's `-preferredversion` copies), looked up by
/// an item's key.
pub struct Versions<'a> {
    versions: Vec<(&'a GroupResource, &'a str)>,
}

impl<'a> Versions<'a> {
    /// The versions of the types `state` listed.
    pub fn of(state: &'a BackupState) -> Versions<'a> {
        Versions { versions: state.resources.iter().flatten().map(|r| (&r.gr, r.version.as_str())).collect() }
    }

    /// The preferred version of `key`'s type (empty when it was not listed: the archive build
    /// refuses an empty version).
    pub fn of_key(&self, key: &ItemKey) -> &'a str {
        let of = |(gr, _): &&(&GroupResource, &str)| gr.group == key.group() && gr.resource == key.resource();
        self.versions.iter().find(of).map_or("", |(_, v)| v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::BlockOutcome;
    use crate::grouping::BlockPlan;
    use crate::spec::BackupSpec;
    use std::sync::Arc;

    fn key(n: &str) -> ItemKey {
        ItemKey::namespaced("", "configmaps", "ns", n)
    }

    fn write(block: u32, attempt: u32, k: &ItemKey, d: u8) -> Event {
        Event::ItemWritten { block, attempt, key: k.clone(), digest: [d; 32], bytes: 1 }
    }

    /// The writes `final_write` keeps, in log order, with their version.
    fn gathered(events: &[Event]) -> Vec<(u32, String, u8, String)> {
        let s = BackupState::fold(events).unwrap();
        let versions = Versions::of(&s);
        events
            .iter()
            .filter_map(|e| final_write(&s, e))
            .map(|(b, k, d)| (b, k.name().to_string(), d[0], versions.of_key(k).to_string()))
            .collect()
    }

    /// Only a finished block's last attempt counts (every write of it, in log order: the archive
    /// build keeps an item's latest); a key the plan does not list counts too; an unfinished block
    /// gives nothing; each write's version is its type's.
    #[test]
    fn the_entries_are_the_last_attempts_latest_writes() {
        let plan = |id: u32, names: &[&str]| {
            Arc::new(BlockPlan {
                id,
                items: names.iter().map(|n| key(n)).collect(),
                hooks: Box::default(),
                bodies: Box::default(),
            })
        };
        let start = |block: u32, attempt: u32| Event::BlockStarted { block, attempt, at_ms: 2 };
        let finish = |block: u32, attempt: u32| Event::BlockFinished {
            block,
            attempt,
            outcome: BlockOutcome::Completed,
            at_ms: 3,
        };
        let events = [
            Event::BackupRequested { spec: BackupSpec::new("b"), workers: 2, at_ms: 1 },
            Event::ResourcesDiscovered {
                resources: vec![crate::item::ResourceType::new("", "v1", "configmaps", "ConfigMap", true)],
            },
            Event::BlockPlanned { blocks: vec![plan(0, &["a", "b"]), plan(1, &["c", "x"]), plan(2, &["d"])] },
            start(0, 1),
            write(0, 1, &key("a"), 1),
            write(0, 1, &key("b"), 1),
            start(0, 2),
            start(1, 1),
            start(2, 1),
            write(1, 1, &key("x"), 7),
            write(0, 2, &key("b"), 2),
            write(1, 1, &key("c"), 3),
            write(0, 2, &key("snap"), 5),
            write(1, 1, &key("c"), 4),
            write(2, 1, &key("d"), 9),
            write(0, 2, &key("x"), 6),
            finish(1, 1),
            finish(0, 2),
        ];
        let got = gathered(&events);
        let want = [(1, "x", 7), (0, "b", 2), (1, "c", 3), (0, "snap", 5), (1, "c", 4), (0, "x", 6)];
        assert_eq!(got, want.map(|(b, n, d)| (b, n.to_string(), d, "v1".to_string())));
        let s = BackupState::fold(&events).unwrap();
        assert_eq!(Versions::of(&s).of_key(&ItemKey::namespaced("", "secrets", "ns", "a")), "");
    }
}
