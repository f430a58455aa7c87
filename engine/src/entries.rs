//! The archive's entries, read from the log rather than held by the fold.
//!
//! Which items the archive holds is a fact of the log: every `ItemWritten` of a finished block's
//! last attempt. The fold used to keep those writes in a table for the whole backup (~56 bytes an
//! item, ~60 MB at a million objects, alive through the write phase and the archive build); it now
//! keeps only each finished block's count, and the shell goes through the log's events once when
//! the archive is built, handing each to [`ArchiveEntries::push`]. [`final_write`] is the one rule
//! of which writes count, shared with the resource list.

use std::sync::Arc;

use crate::engine::{ArchiveEntry, EntryKey};
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

/// The archive's entries, gathered from the log's events in log order ([`ArchiveEntries::push`]):
/// each finished block's last attempt's writes, an item the attempt wrote twice once as its latest
/// write, sorted by key ([`ArchiveEntries::finish`]). Two blocks writing one key stay two entries
/// (the archive build tells identical copies from a conflict). A key the block's plan lists is held
/// as its position there ([`EntryKey::in_plan`]), sharing the plan's string.
pub struct ArchiveEntries<'a> {
    state: &'a BackupState,
    /// Each served type's preferred version, once.
    versions: Vec<(&'a GroupResource, Arc<str>)>,
    /// Per block, how many of its last attempt's writes were seen: where in its plan the next
    /// one is looked for first ([`crate::state::BlockState::plan_position`]).
    seen: Vec<u32>,
    entries: Vec<ArchiveEntry>,
    /// The block of each entry.
    blocks: Vec<u32>,
}

impl<'a> ArchiveEntries<'a> {
    /// Starts gathering the entries of the backup whose whole log folds to `state`.
    pub fn new(state: &'a BackupState) -> ArchiveEntries<'a> {
        let versions = state.resources.iter().flatten().map(|r| (&r.gr, Arc::from(r.version.as_str()))).collect();
        let items = usize::try_from(state.items_done()).unwrap_or(0);
        ArchiveEntries {
            state,
            versions,
            seen: vec![0; state.blocks.len()],
            entries: Vec::with_capacity(items),
            blocks: Vec::with_capacity(items),
        }
    }

    /// Takes the log's next event.
    pub fn push(&mut self, e: &Event) {
        let Some((block, key, digest)) = final_write(self.state, e) else { return };
        let b = &self.state.blocks[block as usize];
        let next = self.seen[block as usize];
        self.seen[block as usize] += 1;
        let at = b.plan_position(key, next as usize);
        let key = match at.and_then(|i| EntryKey::in_plan(&b.plan, i)) {
            Some(k) => k,
            None => EntryKey::from(key.clone()),
        };
        let version = self.version_of(&key);
        self.entries.push(ArchiveEntry { key, version, digest: *digest });
        self.blocks.push(block);
    }

    fn version_of(&self, key: &ItemKey) -> Arc<str> {
        let of = |(gr, _): &&(&GroupResource, Arc<str>)| gr.group == key.group() && gr.resource == key.resource();
        self.versions.iter().find(of).map_or_else(|| Arc::from(""), |(_, v)| v.clone())
    }

    /// The entries, sorted by key (of one key, in block order), each block's item once.
    pub fn finish(self) -> Vec<ArchiveEntry> {
        let ArchiveEntries { mut entries, blocks, .. } = self;
        let mut order: Vec<u32> = (0..entries.len() as u32).collect();
        // Stable: of one block's writes of one key, the latest is last.
        order.sort_by(|&a, &b| {
            let (a, b) = (a as usize, b as usize);
            entries[a].key.cmp(&entries[b].key).then(blocks[a].cmp(&blocks[b]))
        });
        // `gone[k]`: the entry to land at sorted position `k` is overwritten by a later write.
        let gone: Vec<bool> = (0..order.len())
            .map(|k| {
                let (a, b) = (order[k] as usize, order.get(k + 1).map(|&i| i as usize));
                b.is_some_and(|b| blocks[a] == blocks[b] && entries[a].key == entries[b].key)
            })
            .collect();
        drop(blocks);
        crate::grouping::permute_in_place(&mut entries, order);
        let mut at = 0;
        entries.retain(|_| {
            at += 1;
            !gone[at - 1]
        });
        entries
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::BlockOutcome;
    use crate::grouping::BlockPlan;
    use crate::spec::BackupSpec;

    fn key(n: &str) -> ItemKey {
        ItemKey::namespaced("", "configmaps", "ns", n)
    }

    fn write(block: u32, attempt: u32, k: &ItemKey, d: u8) -> Event {
        Event::ItemWritten { block, attempt, key: k.clone(), digest: [d; 32], bytes: 1 }
    }

    fn gathered(events: &[Event]) -> Vec<(String, u8)> {
        let s = BackupState::fold(events).unwrap();
        let mut g = ArchiveEntries::new(&s);
        for e in events {
            g.push(e);
        }
        g.finish().iter().map(|e| (e.key.name().to_string(), e.digest[0])).collect()
    }

    /// Only a finished block's last attempt counts; an item written twice by it is its latest
    /// write; a key the plan does not list is kept as itself; two blocks writing one key stay two
    /// entries, in block order; an unfinished block gives nothing.
    #[test]
    fn the_entries_are_the_last_attempts_latest_writes() {
        let plan = |id: u32, names: &[&str]| {
            Arc::new(BlockPlan { id, items: names.iter().map(|n| key(n)).collect(), hooks: Vec::new() })
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
        let want = [("b", 2), ("c", 4), ("snap", 5), ("x", 6), ("x", 7)];
        assert_eq!(got, want.map(|(n, d)| (n.to_string(), d)));
        // The plan's keys are shared, the other one is its own.
        let s = BackupState::fold(&events).unwrap();
        let mut g = ArchiveEntries::new(&s);
        events.iter().for_each(|e| g.push(e));
        let entries = g.finish();
        let shared =
            |n: &str| entries.iter().any(|e| e.key.name() == n && std::ptr::eq(&*e.key, &s.blocks[0].plan.items[1]));
        assert!(shared("b"));
        assert!(!shared("snap"));
    }
}
