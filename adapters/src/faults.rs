//! Named fault points of the store edge (STYLE §9): [`FaultyStore`] wraps a store and fails chosen
//! operations, so tests can show what a store outage does to a backup.
//!
//! A [`FaultPlan`] says, per operation (`put_item`, `finalize`, `put_file`), whether calls fail
//! never, always, or the first N times **per key** — per key, not globally, so the outcome does not
//! depend on how concurrent workers interleave. The binary reads a plan from
//! [`FAULT_ENV`] (`BLOCKWISE_FAULT_STORE=put_item=first:2,finalize=always`) only in debug builds
//! (`cfg(debug_assertions)`): release builds compile the hook away, so no environment variable can
//! make a production backup fail. Injected failures are transient ([`StoreError::Injected`]), so
//! [`crate::store::RetryingStore`] retries them like a network error.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use blockwise_engine::state::ArchiveInfo;
use blockwise_engine::ItemKey;
use bytes::Bytes;

use crate::entry_runs::ArchiveEntries;
use crate::store::{Store, StoreError};

/// The environment variable the debug binary reads a [`FaultPlan`] from.
pub const FAULT_ENV: &str = "BLOCKWISE_FAULT_STORE";

/// How one operation fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fault {
    /// Never.
    #[default]
    None,
    /// The first N calls for each key fail, later ones go through.
    FirstPerKey(u32),
    /// Every call fails.
    Always,
}

/// Faults per store operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FaultPlan {
    /// Staging an item.
    pub put_item: Fault,
    /// Building and storing the archive.
    pub finalize: Fault,
    /// Storing a companion file.
    pub put_file: Fault,
}

impl FaultPlan {
    /// Parses `op=mode[,op=mode…]`, op one of `put_item`, `finalize`, `put_file`, mode `always`,
    /// `never` or `first:N`.
    pub fn parse(text: &str) -> Result<FaultPlan, String> {
        let mut plan = FaultPlan::default();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (op, mode) = part.split_once('=').ok_or_else(|| format!("{FAULT_ENV}: {part:?} is not op=mode"))?;
            let fault = match mode.trim() {
                "always" => Fault::Always,
                "never" => Fault::None,
                m => match m.strip_prefix("first:").map(str::parse::<u32>) {
                    Some(Ok(n)) => Fault::FirstPerKey(n),
                    _ => return Err(format!("{FAULT_ENV}: mode {m:?} is not always, never or first:N")),
                },
            };
            match op.trim() {
                "put_item" => plan.put_item = fault,
                "finalize" => plan.finalize = fault,
                "put_file" => plan.put_file = fault,
                o => return Err(format!("{FAULT_ENV}: unknown operation {o:?} (put_item, finalize, put_file)")),
            }
        }
        Ok(plan)
    }

    /// The plan in [`FAULT_ENV`], in debug builds; `None` when unset (and always in release builds).
    pub fn from_env() -> Result<Option<FaultPlan>, String> {
        #[cfg(debug_assertions)]
        if let Some(text) = std::env::var_os(FAULT_ENV) {
            let text = text.into_string().map_err(|_| format!("{FAULT_ENV} is not UTF-8"))?;
            return FaultPlan::parse(&text).map(Some);
        }
        Ok(None)
    }
}

/// A store that fails on purpose according to a [`FaultPlan`], then delegates.
pub struct FaultyStore {
    inner: Arc<dyn Store>,
    plan: FaultPlan,
    calls: Mutex<HashMap<(&'static str, String), u32>>,
}

impl FaultyStore {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Store>, plan: FaultPlan) -> FaultyStore {
        FaultyStore { inner, plan, calls: Mutex::new(HashMap::new()) }
    }

    /// Counts the call and says whether it must fail.
    fn check(&self, op: &'static str, fault: Fault, key: String) -> Result<(), StoreError> {
        let n = {
            let mut calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
            let n = calls.entry((op, key.clone())).or_insert(0);
            *n += 1;
            *n
        };
        let fail = match fault {
            Fault::None => false,
            Fault::Always => true,
            Fault::FirstPerKey(first) => n <= first,
        };
        if fail {
            Err(StoreError::Injected { op, key })
        } else {
            Ok(())
        }
    }

    /// Calls made so far of `op` for `key` (failed ones included).
    pub fn calls(&self, op: &'static str, key: &str) -> u32 {
        let calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        calls.get(&(op, key.to_string())).copied().unwrap_or(0)
    }
}

#[async_trait]
impl Store for FaultyStore {
    async fn put_item(&self, backup: &str, key: &ItemKey, bytes: &[u8]) -> Result<(), StoreError> {
        self.check("put", self.plan.put_item, format!("{backup}/staging/{}", key.archive_path()))?;
        self.inner.put_item(backup, key, bytes).await
    }

    async fn sync_staged(&self, backup: &str) -> Result<(), StoreError> {
        self.inner.sync_staged(backup).await
    }

    async fn finalize(&self, backup: &str, entries: Arc<ArchiveEntries>) -> Result<ArchiveInfo, StoreError> {
        self.check("put", self.plan.finalize, format!("{backup}/{backup}.tar.gz"))?;
        self.inner.finalize(backup, entries).await
    }

    async fn put_file(&self, backup: &str, name: &str, bytes: Bytes) -> Result<(), StoreError> {
        self.check("put", self.plan.put_file, format!("{backup}/{name}"))?;
        self.inner.put_file(backup, name, bytes).await
    }

    async fn get_file(&self, backup: &str, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get_file(backup, name).await
    }

    async fn download_file(&self, backup: &str, name: &str, dest: &Path) -> Result<bool, StoreError> {
        self.inner.download_file(backup, name, dest).await
    }

    fn describe(&self) -> String {
        format!("{} (with injected faults)", self.inner.describe())
    }

    fn archive_location(&self, backup: &str) -> String {
        self.inner.archive_location(backup)
    }
}

#[cfg(test)]
mod tests {
    use blockwise_engine::ItemKey;
    use sha2::{Digest, Sha256};

    use super::*;
    use crate::entry_runs::ArchiveEntry;
    use crate::store::{LocalStore, RetryPolicy, RetryingStore};

    fn fast() -> RetryPolicy {
        RetryPolicy { attempts_max: 3, backoff_initial_ms: 1, backoff_max_ms: 4 }
    }

    fn stores(plan: FaultPlan) -> (tempfile::TempDir, Arc<FaultyStore>, RetryingStore) {
        let tmp = tempfile::tempdir().unwrap();
        let faulty = Arc::new(FaultyStore::new(Arc::new(LocalStore::new(tmp.path())), plan));
        let retrying = RetryingStore::new(faulty.clone(), fast(), Arc::new(crate::world::TokioRuntime));
        (tmp, faulty, retrying)
    }

    #[test]
    fn plans_parse_and_bad_ones_are_named() {
        let p = FaultPlan::parse("put_item=first:2, finalize=always").unwrap();
        assert_eq!(p, FaultPlan { put_item: Fault::FirstPerKey(2), finalize: Fault::Always, put_file: Fault::None });
        assert_eq!(FaultPlan::parse("").unwrap(), FaultPlan::default());
        assert!(FaultPlan::parse("put_item").unwrap_err().contains("not op=mode"));
        assert!(FaultPlan::parse("get=always").unwrap_err().contains("unknown operation \"get\""));
        assert!(FaultPlan::parse("put_item=sometimes").unwrap_err().contains("mode \"sometimes\""));
    }

    #[tokio::test]
    async fn a_put_failing_n_times_then_succeeding_is_retried_within_the_bound() {
        let (_tmp, faulty, store) = stores(FaultPlan { put_item: Fault::FirstPerKey(2), ..FaultPlan::default() });
        let key = ItemKey::namespaced("", "pods", "ns1", "a");
        store.put_item("b1", &key, b"{}").await.unwrap();
        assert_eq!(faulty.calls("put", "b1/staging/resources/pods/namespaces/ns1/a.json"), 3);
        // Per key: another item fails twice too, and also gets through.
        let other = ItemKey::namespaced("", "pods", "ns1", "b");
        store.put_item("b1", &other, b"{}").await.unwrap();
        let entries: Vec<ArchiveEntry> = [&key, &other]
            .iter()
            .map(|k| ArchiveEntry { key: (*k).clone(), version: "v1".into(), digest: Sha256::digest(b"{}").into() })
            .collect();
        assert_eq!(store.finalize("b1", Arc::new(ArchiveEntries::of(&entries).unwrap())).await.unwrap().items, 2);
    }

    #[tokio::test]
    async fn a_put_that_always_fails_gives_up_with_an_error_naming_the_key() {
        let (_tmp, faulty, store) = stores(FaultPlan { put_item: Fault::Always, ..FaultPlan::default() });
        let key = ItemKey::namespaced("", "pods", "ns1", "a");
        let e = store.put_item("b1", &key, b"{}").await.unwrap_err();
        assert!(matches!(e, StoreError::GaveUp { attempts: 3, .. }), "{e}");
        assert_eq!(
            e.to_string(),
            "store: cannot put b1/staging/resources/pods/namespaces/ns1/a.json: injected fault (gave up after 3 attempts)"
        );
        assert_eq!(faulty.calls("put", "b1/staging/resources/pods/namespaces/ns1/a.json"), 3);
    }

    #[tokio::test]
    async fn permanent_errors_are_not_retried() {
        let (_tmp, faulty, store) = stores(FaultPlan::default());
        let bad = ItemKey::namespaced("", "pods", "..", "a");
        let e = store.put_item("b1", &bad, b"{}").await.unwrap_err();
        assert!(matches!(e, StoreError::UnsafeKey { .. }), "{e}");
        assert_eq!(faulty.calls("put", "b1/staging/resources/pods/namespaces/../a.json"), 1);
    }
}
