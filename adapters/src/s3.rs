//! The S3-compatible store (`--storage s3://BUCKET/PREFIX`), over the `object_store` crate.
//!
//! [`S3Store`] keeps Velero's layout under the prefix: items are staged under
//! `<prefix>/backups/<name>/staging/<archive path>` (inside the backup's own directory, so Velero's
//! check of the prefix's top-level directories still passes and deleting the backup with Velero
//! removes them), and the archive and companion files sit at `<prefix>/backups/<name>/<file>`. Every
//! put overwrites under a deterministic key, so a re-put after a resume is harmless.
//!
//! `finalize` downloads each staged item once (a bounded number of GETs in flight), checks it
//! against the digest the log recorded, and builds the archive into a scratch file with the same
//! [`write_archive`] the local store uses — so both stores give byte-identical archives. The file is
//! uploaded with one PUT up to `multipart_threshold_bytes`, as a multipart upload above it.
//!
//! Credentials come from the standard AWS environment variables (access keys, session token, web
//! identity, container credentials) or, when no key is set there, from the shared credentials file
//! (`AWS_SHARED_CREDENTIALS_FILE` or `~/.aws/credentials`, profile `AWS_PROFILE` or `default`).
//! Endpoint, region and plain HTTP come only from [`S3Config`] (the command line), never from the
//! environment, so `resume` reaches exactly the store the backup was created with. Retries: the
//! HTTP client retries each request within [`s3_retry_config`]; [`crate::store::RetryingStore`]
//! retries whole operations on top.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{BufWriter, Read, Write};
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use blockwise_engine::item::is_safe_name;
use blockwise_engine::state::ArchiveInfo;
use blockwise_engine::ItemKey;
use bytes::Bytes;
use futures::StreamExt;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path;
use object_store::{
    BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig, WriteMultipart,
};
use serde::{Deserialize, Serialize};

use crate::entry_runs::{ArchiveEntries, Item};
use crate::store::{
    check_key, check_name, commit, create_dirs, temp_path, unstaged_error, verify_staged, write_archive, Store,
    StoreError,
};

/// Archives larger than this are uploaded as a multipart upload.
pub const MULTIPART_THRESHOLD_BYTES_DEFAULT: u64 = 64 << 20;
/// Size of each part of a multipart upload (S3 needs at least 5 MiB for all parts but the last).
pub const MULTIPART_PART_BYTES_DEFAULT: usize = 16 << 20;
/// Parts uploaded at once.
pub const MULTIPART_PARTS_IN_FLIGHT_MAX: usize = 4;
/// Staged items downloaded at once while the archive is built.
pub const FINALIZE_GETS_IN_FLIGHT_MAX: usize = 16;
/// Retries of one HTTP request by the client.
pub const S3_REQUEST_RETRIES_MAX: usize = 3;
/// Time after which a request is no longer retried.
pub const S3_REQUEST_RETRY_TIMEOUT_MS: u64 = 30_000;
/// Timeout of one HTTP request.
pub const S3_REQUEST_TIMEOUT_MS: u64 = 60_000;
/// Timeout of one connection attempt.
pub const S3_CONNECT_TIMEOUT_MS: u64 = 5_000;

/// Where an S3 store is, without credentials: what `storage.json` records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct S3Location {
    /// Bucket name.
    pub bucket: String,
    /// Key prefix, without leading or trailing `/`; may be empty.
    pub prefix: String,
    /// Endpoint URL (`None`: AWS's own, from the region).
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Region (`None`: `AWS_REGION`/`AWS_DEFAULT_REGION`, else `us-east-1`).
    #[serde(default)]
    pub region: Option<String>,
    /// Whether a plain `http://` endpoint is allowed.
    #[serde(default)]
    pub allow_http: bool,
}

impl S3Location {
    /// Parses `s3://BUCKET[/PREFIX]`; every prefix segment must be a safe path component.
    pub fn parse(url: &str) -> Result<S3Location, StoreError> {
        let bad = |reason: &str| StoreError::BadLocation { location: url.to_string(), reason: reason.to_string() };
        let rest = url.strip_prefix("s3://").ok_or_else(|| bad("expected s3://BUCKET/PREFIX"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let bucket_ok = (3..=63).contains(&bucket.len())
            && bucket.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
            && !bucket.starts_with(['-', '.'])
            && !bucket.ends_with(['-', '.']);
        if !bucket_ok {
            return Err(bad("the bucket name must be 3-63 lower-case letters, digits, '-' or '.'"));
        }
        let prefix = prefix.trim_end_matches('/');
        if !prefix.is_empty() && !prefix.split('/').all(is_safe_name) {
            return Err(bad(
                "every prefix segment must be a plain name: no empty segment, '.', '..', '\\' or control characters",
            ));
        }
        Ok(S3Location {
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
            endpoint: None,
            region: None,
            allow_http: false,
        })
    }

    /// `s3://bucket/prefix`.
    pub fn url(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, self.prefix)
        }
    }
}

/// Everything an [`S3Store`] needs besides credentials.
#[derive(Debug, Clone)]
pub struct S3Config {
    /// Bucket, prefix, endpoint, region.
    pub location: S3Location,
    /// A local directory for the archive while it is built.
    pub scratch_dir: PathBuf,
    /// Archives above this size go up as a multipart upload.
    pub multipart_threshold_bytes: u64,
    /// Part size of a multipart upload.
    pub multipart_part_bytes: usize,
}

impl S3Config {
    /// The defaults for a location.
    pub fn new(location: S3Location, scratch_dir: PathBuf) -> S3Config {
        S3Config {
            location,
            scratch_dir,
            multipart_threshold_bytes: MULTIPART_THRESHOLD_BYTES_DEFAULT,
            multipart_part_bytes: MULTIPART_PART_BYTES_DEFAULT,
        }
    }
}

/// The HTTP-level retry bounds: at most [`S3_REQUEST_RETRIES_MAX`] retries within
/// [`S3_REQUEST_RETRY_TIMEOUT_MS`], backing off from 100 ms doubling up to 2 s.
pub fn s3_retry_config() -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            base: 2.0,
        },
        max_retries: S3_REQUEST_RETRIES_MAX,
        retry_timeout: Duration::from_millis(S3_REQUEST_RETRY_TIMEOUT_MS),
    }
}

/// The environment variables passed to the S3 client: credentials and region only.
const CREDENTIAL_ENV: &[&str] = &[
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
    "AWS_ROLE_SESSION_NAME",
    "AWS_ENDPOINT_URL_STS",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
];

/// Keys of one profile of an INI-style AWS file (`[name]` or `[profile name]` sections).
pub fn ini_profile(text: &str, profile: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut inside = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') || line.starts_with(';') || line.is_empty() {
            continue;
        }
        if let Some(section) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let section = section.trim();
            inside = section == profile || section.strip_prefix("profile ").map(str::trim) == Some(profile);
            continue;
        }
        if inside {
            if let Some((k, v)) = line.split_once('=') {
                out.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
    }
    out
}

/// Access keys from the shared credentials file, when the environment has none.
fn profile_credentials() -> Option<HashMap<String, String>> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    if env("AWS_ACCESS_KEY_ID").is_some() {
        return None;
    }
    let file = env("AWS_SHARED_CREDENTIALS_FILE")
        .map(PathBuf::from)
        .or_else(|| env("HOME").map(|h| PathBuf::from(h).join(".aws").join("credentials")))?;
    let text = fs::read_to_string(file).ok()?;
    let keys = ini_profile(&text, &env("AWS_PROFILE").unwrap_or_else(|| "default".into()));
    keys.contains_key("aws_access_key_id").then_some(keys)
}

/// A store in an S3-compatible bucket.
pub struct S3Store {
    inner: Arc<dyn ObjectStore>,
    cfg: S3Config,
}

impl std::fmt::Debug for S3Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Store").field("location", &self.cfg.location).finish()
    }
}

impl S3Store {
    /// Connects (lazily: no request is made here) to the bucket with credentials from the environment.
    pub fn new(cfg: S3Config) -> Result<S3Store, StoreError> {
        let loc = &cfg.location;
        let mut b = AmazonS3Builder::new().with_bucket_name(&loc.bucket);
        for key in CREDENTIAL_ENV {
            if let Some(v) = std::env::var(key).ok().filter(|v| !v.is_empty()) {
                if let Ok(k) = key.to_ascii_lowercase().parse::<AmazonS3ConfigKey>() {
                    b = b.with_config(k, v);
                }
            }
        }
        if let Some(keys) = profile_credentials() {
            for (name, key) in [
                ("aws_access_key_id", AmazonS3ConfigKey::AccessKeyId),
                ("aws_secret_access_key", AmazonS3ConfigKey::SecretAccessKey),
                ("aws_session_token", AmazonS3ConfigKey::Token),
            ] {
                if let Some(v) = keys.get(name) {
                    b = b.with_config(key, v);
                }
            }
        }
        let region = loc
            .region
            .clone()
            .or_else(|| std::env::var("AWS_REGION").ok().filter(|v| !v.is_empty()))
            .or_else(|| std::env::var("AWS_DEFAULT_REGION").ok().filter(|v| !v.is_empty()))
            .unwrap_or_else(|| "us-east-1".to_string());
        b = b.with_region(region);
        if let Some(endpoint) = &loc.endpoint {
            if endpoint.starts_with("http://") && !loc.allow_http {
                return Err(StoreError::BadLocation {
                    location: loc.url(),
                    reason: format!("endpoint {endpoint} is plain HTTP; pass --s3-allow-http to use it"),
                });
            }
            b = b.with_endpoint(endpoint);
        }
        let client = ClientOptions::new()
            .with_allow_http(loc.allow_http)
            .with_timeout(Duration::from_millis(S3_REQUEST_TIMEOUT_MS))
            .with_connect_timeout(Duration::from_millis(S3_CONNECT_TIMEOUT_MS));
        let store = b
            .with_client_options(client)
            .with_retry(s3_retry_config())
            .build()
            .map_err(|source| StoreError::Remote { op: "configure", key: loc.url(), source })?;
        Ok(S3Store { inner: Arc::new(store), cfg })
    }

    /// A store over any `object_store` implementation (tests use the in-memory one).
    pub fn with_object_store(inner: Arc<dyn ObjectStore>, cfg: S3Config) -> S3Store {
        S3Store { inner, cfg }
    }

    /// The key of `rest` (already-checked components) under the backup's directory.
    fn key(&self, backup: &str, rest: &[&str]) -> Path {
        let mut parts: Vec<&str> = self.cfg.location.prefix.split('/').filter(|s| !s.is_empty()).collect();
        parts.extend(["backups", backup]);
        parts.extend_from_slice(rest);
        parts.into_iter().collect()
    }

    /// Deletes every object under the backup's directory (its archive, files and staged items).
    pub async fn delete_backup(&self, backup: &str) -> Result<u64, StoreError> {
        use futures::TryStreamExt;
        check_name("backup name", backup)?;
        let prefix = self.key(backup, &[]);
        let keys: Vec<Path> = self
            .inner
            .list(Some(&prefix))
            .map_ok(|m| m.location)
            .try_collect()
            .await
            .map_err(self.remote("list", &prefix))?;
        for k in &keys {
            match self.inner.delete(k).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(self.remote("delete", k)(e)),
            }
        }
        Ok(keys.len() as u64)
    }

    /// The full URL of a key, for messages.
    fn url(&self, key: &Path) -> String {
        format!("s3://{}/{key}", self.cfg.location.bucket)
    }

    fn remote(&self, op: &'static str, key: &Path) -> impl FnOnce(object_store::Error) -> StoreError {
        let key = self.url(key);
        move |source| StoreError::Remote { op, key, source }
    }

    fn staged_key(&self, backup: &str, key: &ItemKey) -> Result<(Path, String), StoreError> {
        check_name("backup name", backup)?;
        check_key(key)?;
        let archive_path = key.archive_path();
        let mut rest = vec!["staging"];
        rest.extend(archive_path.split('/'));
        let k = self.key(backup, &rest);
        Ok((k, archive_path))
    }

    fn file_key(&self, backup: &str, name: &str) -> Result<Path, StoreError> {
        check_name("backup name", backup)?;
        check_name("file name", name)?;
        if name == "staging" {
            return Err(StoreError::UnsafeName { what: "file name", value: name.to_string() });
        }
        Ok(self.key(backup, &[name]))
    }

    /// Downloads one staged item and checks its digest.
    async fn fetch_staged(&self, backup: &str, entry: &Item) -> Result<Vec<u8>, StoreError> {
        let (key, _) = self.staged_key(backup, &entry.key)?;
        let bytes = match self.inner.get(&key).await {
            Ok(r) => r.bytes().await.map_err(self.remote("read", &key))?,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(StoreError::NotStaged { key: entry.key.to_string(), path: PathBuf::from(self.url(&key)) });
            }
            Err(e) => return Err(self.remote("get", &key)(e)),
        };
        verify_staged(entry, &bytes)?;
        Ok(bytes.to_vec())
    }

    /// Builds the archive into `tmp` from the staged items: each downloaded once into `scratch`.
    async fn build(
        &self,
        backup: &str,
        entries: &ArchiveEntries,
        scratch: &FsPath,
        tmp: &FsPath,
    ) -> Result<ArchiveInfo, StoreError> {
        let io = |op: &'static str, path: &FsPath| {
            let path = path.to_path_buf();
            move |source| StoreError::Io { op, path, source }
        };
        // One GET per item, a bounded number at a time; each item lands in a scratch file named by
        // its number, since the archive needs it twice (its path and the preferred-version copy).
        let fetches = entries.items()?.map(|item| async move {
            let item = item?;
            let got = self.fetch_staged(backup, &item).await;
            Ok::<_, StoreError>((item, got))
        });
        let mut fetched = futures::stream::iter(fetches).buffer_unordered(FINALIZE_GETS_IN_FLIGHT_MAX);
        // Items missing or changed are all collected, so the engine can stage them again at once.
        let mut unstaged = Vec::new();
        while let Some(r) = fetched.next().await {
            let (item, got) = r?;
            let bytes = match got {
                Ok(b) => b,
                Err(e @ (StoreError::NotStaged { .. } | StoreError::DigestMismatch { .. })) => {
                    unstaged.push((item.key, e));
                    continue;
                }
                Err(e) => return Err(e),
            };
            let path = scratch.join(item.ordinal.to_string());
            fs::write(&path, &bytes).map_err(io("write", &path))?;
        }
        if let Some(e) = unstaged_error(&mut unstaged) {
            return Err(e);
        }
        let file = File::create(tmp).map_err(io("create", tmp))?;
        let (buf, info) = write_archive(entries.tar_items()?, BufWriter::new(file), tmp, |item, _| {
            let path = scratch.join(item.ordinal.to_string());
            let bytes = fs::read(&path).map_err(io("read", &path))?;
            verify_staged(item, &bytes)?;
            Ok(bytes)
        })?;
        let mut file = buf.into_inner().map_err(|e| io("write", tmp)(e.into_error()))?;
        file.flush().map_err(io("write", tmp))?;
        Ok(info)
    }

    /// Uploads the local file `src` to `key`: one PUT, or a multipart upload above the threshold.
    async fn upload(&self, src: &FsPath, size: u64, key: &Path) -> Result<(), StoreError> {
        let io = |op: &'static str| {
            let path = src.to_path_buf();
            move |source| StoreError::Io { op, path, source }
        };
        if size <= self.cfg.multipart_threshold_bytes {
            let bytes = fs::read(src).map_err(io("read"))?;
            self.inner.put(key, PutPayload::from(bytes)).await.map_err(self.remote("put", key))?;
            return Ok(());
        }
        let upload = self.inner.put_multipart(key).await.map_err(self.remote("start multipart upload of", key))?;
        let part_bytes = self.cfg.multipart_part_bytes.max(1);
        let mut writer = WriteMultipart::new_with_chunk_size(upload, part_bytes);
        let mut file = File::open(src).map_err(io("open"))?;
        let mut buf = vec![0u8; part_bytes.min(8 << 20)];
        let sent: Result<(), StoreError> = async {
            loop {
                let n = file.read(&mut buf).map_err(io("read"))?;
                if n == 0 {
                    return Ok(());
                }
                writer
                    .wait_for_capacity(MULTIPART_PARTS_IN_FLIGHT_MAX)
                    .await
                    .map_err(self.remote("upload a part of", key))?;
                writer.write(&buf[..n]);
            }
        }
        .await;
        match sent {
            Ok(()) => writer.finish().await.map(|_| ()).map_err(self.remote("complete multipart upload of", key)),
            Err(e) => {
                // Do not leave the parts behind; the error that matters is the first one.
                let _ = writer.abort().await;
                Err(e)
            }
        }
    }
}

#[async_trait]
impl Store for S3Store {
    async fn put_item(&self, backup: &str, key: &ItemKey, bytes: &[u8]) -> Result<(), StoreError> {
        let (k, _) = self.staged_key(backup, key)?;
        self.inner.put(&k, PutPayload::from(bytes.to_vec())).await.map(|_| ()).map_err(self.remote("put", &k))
    }

    async fn finalize(&self, backup: &str, entries: Arc<ArchiveEntries>) -> Result<ArchiveInfo, StoreError> {
        let key = self.file_key(backup, &format!("{backup}.tar.gz"))?;
        create_dirs(&self.cfg.scratch_dir)?;
        let scratch = temp_path(&self.cfg.scratch_dir);
        fs::create_dir(&scratch).map_err(|source| StoreError::Io {
            op: "create directory",
            path: scratch.clone(),
            source,
        })?;
        let tmp = scratch.join("archive.tar.gz");
        let result = async {
            let info = self.build(backup, &entries, &scratch, &tmp).await?;
            self.upload(&tmp, info.bytes, &key).await?;
            Ok(info)
        }
        .await;
        let _ = fs::remove_dir_all(&scratch);
        result
    }

    async fn put_file(&self, backup: &str, name: &str, bytes: Bytes) -> Result<(), StoreError> {
        let k = self.file_key(backup, name)?;
        self.inner.put(&k, PutPayload::from(bytes)).await.map(|_| ()).map_err(self.remote("put", &k))
    }

    async fn get_file(&self, backup: &str, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let k = self.file_key(backup, name)?;
        match self.inner.get(&k).await {
            Ok(r) => Ok(Some(r.bytes().await.map_err(self.remote("read", &k))?.to_vec())),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.remote("get", &k)(e)),
        }
    }

    async fn download_file(&self, backup: &str, name: &str, dest: &FsPath) -> Result<bool, StoreError> {
        let k = self.file_key(backup, name)?;
        let got = match self.inner.get(&k).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => return Ok(false),
            Err(e) => return Err(self.remote("get", &k)(e)),
        };
        let dir = match dest.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => FsPath::new("."),
        };
        create_dirs(dir)?;
        let tmp = temp_path(dir);
        let io = |op: &'static str, path: &FsPath| {
            let path = path.to_path_buf();
            move |source| StoreError::Io { op, path, source }
        };
        let written: Result<(), StoreError> = async {
            let mut file = BufWriter::new(File::create(&tmp).map_err(io("create", &tmp))?);
            let mut stream = got.into_stream();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(self.remote("read", &k))?;
                file.write_all(&chunk).map_err(io("write", &tmp))?;
            }
            let file = file.into_inner().map_err(|e| io("write", &tmp)(e.into_error()))?;
            file.sync_all().map_err(io("sync", &tmp))
        }
        .await;
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        commit(&tmp, dest).map(|()| true)
    }

    fn describe(&self) -> String {
        let loc = &self.cfg.location;
        match &loc.endpoint {
            Some(e) => format!("{} at {e}", loc.url()),
            None => loc.url(),
        }
    }

    fn archive_location(&self, backup: &str) -> String {
        self.url(&self.key(backup, &[format!("{backup}.tar.gz").as_str()]))
    }
}

#[cfg(test)]
mod tests {
    use object_store::memory::InMemory;
    use sha2::{Digest, Sha256};

    use super::*;
    use crate::entry_runs::ArchiveEntry;
    use crate::store::LocalStore;

    #[test]
    fn locations_parse_and_escapes_are_rejected() {
        let l = S3Location::parse("s3://velero-backups/cluster-a/prod/").unwrap();
        assert_eq!((l.bucket.as_str(), l.prefix.as_str()), ("velero-backups", "cluster-a/prod"));
        assert_eq!(l.url(), "s3://velero-backups/cluster-a/prod");
        assert_eq!(S3Location::parse("s3://bkt").unwrap().prefix, "");
        for bad in [
            "s3://bkt/a/../b",
            "s3://bkt/..",
            "s3://bkt//x",
            "s3://bkt/./x",
            "s3://Bkt/x",
            "s3://b",
            "http://bkt/x",
            "bkt",
        ] {
            let e = S3Location::parse(bad).unwrap_err();
            assert!(matches!(e, StoreError::BadLocation { .. }), "{bad}: {e}");
            assert!(e.to_string().starts_with(&format!("storage {bad:?}: ")), "{e}");
        }
    }

    #[test]
    fn plain_http_needs_to_be_asked_for() {
        let mut loc = S3Location::parse("s3://bkt/p").unwrap();
        loc.endpoint = Some("http://127.0.0.1:9".into());
        let e = S3Store::new(S3Config::new(loc.clone(), std::env::temp_dir())).unwrap_err();
        assert!(e.to_string().contains("pass --s3-allow-http"), "{e}");
        loc.allow_http = true;
        assert!(S3Store::new(S3Config::new(loc, std::env::temp_dir())).is_ok());
    }

    #[test]
    fn profiles_are_read_from_ini_sections() {
        let text =
            "[default]\naws_access_key_id = A\n[profile other]\naws_access_key_id=B\naws_secret_access_key = S\n";
        assert_eq!(ini_profile(text, "default")["aws_access_key_id"], "A");
        let other = ini_profile(text, "other");
        assert_eq!((other["aws_access_key_id"].as_str(), other["aws_secret_access_key"].as_str()), ("B", "S"));
        assert!(ini_profile(text, "none").is_empty());
    }

    fn memory_store(tmp: &FsPath, threshold: u64) -> (Arc<InMemory>, S3Store) {
        let mem = Arc::new(InMemory::new());
        let mut cfg = S3Config::new(S3Location::parse("s3://bkt/team/a").unwrap(), tmp.join("scratch"));
        cfg.multipart_threshold_bytes = threshold;
        cfg.multipart_part_bytes = 1 << 10;
        (mem.clone(), S3Store::with_object_store(mem, cfg))
    }

    fn items() -> Vec<(ItemKey, Vec<u8>)> {
        (0..40)
            .map(|i| {
                let key = ItemKey::namespaced("", "configmaps", &format!("ns{}", i % 3), &format!("cm-{i}"));
                (key, format!("{{\"data\":\"{}\"}}", "x".repeat(i * 97)).into_bytes())
            })
            .collect()
    }

    fn set(entries: &[ArchiveEntry]) -> Arc<ArchiveEntries> {
        Arc::new(ArchiveEntries::of(entries).unwrap())
    }

    async fn stage(store: &dyn Store) -> Vec<ArchiveEntry> {
        let mut entries = Vec::new();
        for (key, bytes) in items().into_iter().rev() {
            store.put_item("b1", &key, &bytes).await.unwrap();
            entries.push(ArchiveEntry { key, version: "v1".into(), digest: Sha256::digest(&bytes).into() });
        }
        entries
    }

    #[tokio::test]
    async fn archive_matches_the_local_store_byte_for_byte_single_and_multipart() {
        let tmp = tempfile::tempdir().unwrap();
        let local = LocalStore::new(tmp.path().join("local"));
        let entries = stage(&local).await;
        let info = local.finalize("b1", set(&entries)).await.unwrap();
        let expected = fs::read(local.archive_path("b1").unwrap()).unwrap();
        for threshold in [u64::MAX, 0] {
            let (mem, s3) = memory_store(tmp.path(), threshold);
            let e = stage(&s3).await;
            let got = s3.finalize("b1", set(&e)).await.unwrap();
            assert_eq!(got, info, "threshold {threshold}");
            let stored = mem.get(&Path::from("team/a/backups/b1/b1.tar.gz")).await.unwrap().bytes().await.unwrap();
            assert!(stored.as_ref() == expected.as_slice(), "threshold {threshold}: archive bytes differ");
            assert!(mem
                .head(&Path::from("team/a/backups/b1/staging/resources/configmaps/namespaces/ns0/cm-0.json"))
                .await
                .is_ok());
            // Download streams it back; the scratch directory is empty again.
            let dest = tmp.path().join("dl").join("b1.tar.gz");
            assert!(s3.download_file("b1", "b1.tar.gz", &dest).await.unwrap());
            assert_eq!(fs::read(&dest).unwrap(), expected);
            assert!(!s3.download_file("b1", "nope.json", &dest).await.unwrap());
            assert_eq!(fs::read_dir(tmp.path().join("scratch")).unwrap().count(), 0);
        }
        assert_eq!(memory_store(tmp.path(), 0).1.archive_location("b1"), "s3://bkt/team/a/backups/b1/b1.tar.gz");
    }

    #[tokio::test]
    async fn a_tampered_or_missing_staged_item_fails_finalize_naming_it() {
        let tmp = tempfile::tempdir().unwrap();
        let (mem, s3) = memory_store(tmp.path(), u64::MAX);
        let entries = stage(&s3).await;
        let victim = Path::from("team/a/backups/b1/staging/resources/configmaps/namespaces/ns1/cm-1.json");
        mem.put(&victim, PutPayload::from_static(b"{}")).await.unwrap();
        let e = s3.finalize("b1", set(&entries)).await.unwrap_err();
        assert!(
            matches!(&e, StoreError::Unstaged { keys, first } if keys.len() == 1 && matches!(**first, StoreError::DigestMismatch { .. }))
                && e.to_string().contains("configmaps ns1/cm-1"),
            "{e}"
        );
        mem.delete(&victim).await.unwrap();
        let e = s3.finalize("b1", set(&entries)).await.unwrap_err();
        assert!(e.to_string().contains("item configmaps ns1/cm-1 is not staged"), "{e}");
        assert!(e.to_string().contains("s3://bkt/team/a/backups/b1/staging/"), "{e}");
        assert!(mem.head(&Path::from("team/a/backups/b1/b1.tar.gz")).await.is_err(), "no archive was stored");
    }

    #[tokio::test]
    async fn unsafe_names_never_reach_the_bucket() {
        let tmp = tempfile::tempdir().unwrap();
        let (mem, s3) = memory_store(tmp.path(), u64::MAX);
        let good = ItemKey::namespaced("", "pods", "ns1", "a");
        for backup in ["", "..", "a/b", "../x"] {
            assert!(matches!(s3.put_item(backup, &good, b"{}").await, Err(StoreError::UnsafeName { .. })), "{backup}");
            assert!(s3.put_file(backup, "velero-backup.json", Bytes::from_static(b"{}")).await.is_err());
            assert!(s3.finalize(backup, set(&[])).await.is_err());
        }
        let bad = ItemKey::namespaced("", "pods", "..", "a");
        assert!(matches!(s3.put_item("b1", &bad, b"{}").await, Err(StoreError::UnsafeKey { .. })));
        for name in ["..", "a/b", "staging", ""] {
            assert!(s3.get_file("b1", name).await.is_err(), "{name:?}");
        }
        assert_eq!(mem.list(None).count().await, 0, "nothing was written");
    }
}
