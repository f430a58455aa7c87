//! Object bodies by reference.
//!
//! Every listed or fetched object reaches the log once, inside its `ResourceListed` or
//! `ItemsFetched` record. Holding all of them in memory as well made a backup's memory grow with
//! its cluster (5 GiB at 300,000 objects), so the state keeps a [`BodyId`] instead: the ordinal of
//! the object among all objects the log carries, in log order ([`Event::bodies`]). The shell keeps
//! the bodies where it can read one back by number (a spill file beside the log, rebuilt from the
//! log on every open, or memory in the simulator) and a write names the body it stages.
//!
//! Claims and PersistentVolumes stay in memory ([`held`]): snapshot planning and Velero's volume
//! information read them after the listing, and a captured claim is written with annotations.

use std::sync::Arc;

use crate::event::Event;
use crate::item::GroupResource;

/// The ordinal of an object among the objects the log carries, from 0.
pub type BodyId = u64;

/// An object's canonical JSON: in memory, or the logged object with this number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// The bytes themselves.
    Held(Arc<str>),
    /// The `n`-th object the log carries.
    Logged(BodyId),
}

impl Body {
    /// The body of `json`, the `n`-th object the log carries, of resource `gr`: held or by number
    /// ([`held`]). The fold and the engine's catalog both number objects with this.
    pub fn of(gr: &GroupResource, json: &str, n: BodyId) -> Body {
        if held(gr) {
            Body::Held(Arc::from(json))
        } else {
            Body::Logged(n)
        }
    }

    /// The JSON, when it is held in memory.
    pub fn held(&self) -> Option<&Arc<str>> {
        match self {
            Body::Held(j) => Some(j),
            Body::Logged(_) => None,
        }
    }
}

/// Whether objects of `gr` stay in memory after they are logged: claims and PersistentVolumes.
pub fn held(gr: &GroupResource) -> bool {
    gr.group.is_empty() && (gr.resource == "persistentvolumeclaims" || gr.resource == "persistentvolumes")
}

impl Event {
    /// The objects this event carries, in the order their [`BodyId`]s are given: a listed page's
    /// objects, and the fetched objects that were found.
    pub fn bodies(&self) -> Box<dyn Iterator<Item = &str> + '_> {
        match self {
            Event::ResourceListed { objects, .. } => Box::new(objects.iter().map(String::as_str)),
            Event::ItemsFetched { items } => Box::new(items.iter().filter_map(|(_, j)| j.as_deref())),
            _ => Box::new(std::iter::empty()),
        }
    }
}
