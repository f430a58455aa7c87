//! Object bodies by reference.
//!
//! Every listed or fetched object reaches the log once, inside its `ResourceListed` or
//! `ItemsFetched` record. Holding all of them in memory as well made a backup's memory grow with
//! its cluster (5 GiB at 300,000 objects), so the state keeps a [`BodyId`] instead: the ordinal of
//! the object among all objects the log carries, in log order ([`Event::bodies`]). The shell keeps
//! the bodies where it can read one back by number (a spill file beside the log, rebuilt from the
//! log on every open, or memory in the simulator) and a write names the body it stages.
//!
//! A captured claim is written with its snapshot's labels and annotations: its body names the
//! logged claim and the snapshot ([`Body::Claim`]), and the shell annotates the bytes it reads back
//! ([`crate::snapshot::annotated_claim`]). (Claims and volumes were held in memory for that, and
//! for Velero's volume information, which now reads them from the log: ~90 MB at a million
//! objects.)

use std::sync::Arc;

use crate::event::Event;

/// The ordinal of an object among the objects the log carries, from 0.
pub type BodyId = u64;

/// An object's canonical JSON: the logged object with this number (as it is, or annotated).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// The `n`-th object the log carries.
    Logged(BodyId),
    /// The `n`-th object the log carries, a claim, with the labels and annotations of its snapshot
    /// in backup `backup` set ([`crate::snapshot::annotated_claim`]).
    Claim { id: BodyId, backup: Arc<str>, snapshot: Arc<str> },
}

impl Body {
    /// The bytes of this body, given a reader of the logged object it names; an error when the
    /// object cannot be read or a claim is not a JSON object.
    pub fn resolve(&self, logged: impl FnOnce(BodyId) -> Result<Arc<str>, String>) -> Result<Arc<str>, String> {
        match self {
            Body::Logged(id) => logged(*id),
            Body::Claim { id, backup, snapshot } => {
                let json = logged(*id)?;
                crate::snapshot::annotated_claim(&json, backup, snapshot)
                    .map(Arc::from)
                    .ok_or_else(|| format!("the logged claim (object {id}) is not a JSON object"))
            }
        }
    }
}

impl Event {
    /// The objects this event carries, in the order their [`BodyId`]s are given: a listed page's
    /// objects, the fetched objects that were found, and a cut snapshot's archived objects (of
    /// each member its VolumeSnapshot, then its VolumeSnapshotContent).
    pub fn bodies(&self) -> Box<dyn Iterator<Item = &str> + '_> {
        match self {
            Event::ResourceListed { objects, .. } => Box::new(objects.iter().map(String::as_str)),
            Event::ItemsFetched { items } => Box::new(items.iter().filter_map(|(_, j)| j.as_deref())),
            Event::SnapshotCut { members, .. } => {
                Box::new(members.iter().flat_map(|m| [m.snapshot_json.as_str(), m.content_json.as_str()]))
            }
            _ => Box::new(std::iter::empty()),
        }
    }
}
