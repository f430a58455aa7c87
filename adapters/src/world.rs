//! What the shell needs from the world besides a cluster, a log and a store: time, jitter, and a
//! place to run work.
//!
//! [`Runtime`] is the seam between the one driver ([`crate::driver`]) and whichever world it runs
//! in. Production uses [`TokioRuntime`]: the wall clock, tokio timers, tokio tasks for commands and
//! `spawn_blocking` for blocking file-system work. The simulator implements the same trait with a
//! virtual clock, seeded jitter and a single thread, so retries, hook timeouts and backoffs run the
//! same code under simulation as in production — only time is fake. Deliberately absent: any
//! decision about *what* to do; a runtime only says *when* and *where*.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A boxed, sendable future.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// A blocking job handed to [`Runtime::offload`].
pub type Job = Box<dyn FnOnce() + Send + 'static>;

/// Time, randomness for jitter, and where work runs.
pub trait Runtime: Send + Sync {
    /// Milliseconds since the Unix epoch (real or virtual).
    fn now_ms(&self) -> u64;
    /// A future that completes after `ms` milliseconds of (real or virtual) time. Dropping it
    /// cancels the timer.
    fn sleep(&self, ms: u64) -> BoxFuture<()>;
    /// A pseudo-random number below `bound` (> 0), for retry jitter. Seeded under simulation.
    fn jitter(&self, bound: u64) -> u64;
    /// Runs `fut` concurrently with the caller (a task in production, the same thread under
    /// simulation). Dropping the returned future cancels the work.
    fn spawn(&self, fut: BoxFuture<()>) -> BoxFuture<()>;
    /// Runs a blocking job (file-system calls, fsync) where it cannot stall other work.
    fn offload(&self, job: Job) -> BoxFuture<()>;
}

/// Runs `f` through [`Runtime::offload`] and returns its result.
pub async fn offload<T, F>(rt: &dyn Runtime, f: F) -> T
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let slot: Arc<Mutex<Option<T>>> = Arc::new(Mutex::new(None));
    let out = slot.clone();
    rt.offload(Box::new(move || {
        let v = f();
        *out.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(v);
    }))
    .await;
    let taken = slot.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
    match taken {
        Some(v) => v,
        // Only reachable if the job panicked; the panic was already reported by the runtime.
        None => panic!("an offloaded job did not produce its result"),
    }
}

/// Runs `fut` to completion, or returns `None` once `ms` milliseconds passed (the future is then
/// dropped, which cancels it). Timeouts are measured on the runtime's clock.
pub async fn timeout<T, F>(rt: &dyn Runtime, ms: u64, fut: F) -> Option<T>
where
    F: Future<Output = T>,
{
    let fut = std::pin::pin!(fut);
    let timer = rt.sleep(ms);
    match futures::future::select(fut, timer).await {
        futures::future::Either::Left((v, _)) => Some(v),
        futures::future::Either::Right(((), _)) => None,
    }
}

/// The production runtime: wall clock, tokio timers and tasks, `spawn_blocking`.
#[derive(Debug, Default, Clone, Copy)]
pub struct TokioRuntime;

/// Aborts a tokio task when dropped, so a cancelled command does not run on.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Runtime for TokioRuntime {
    fn now_ms(&self) -> u64 {
        SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
    }

    fn sleep(&self, ms: u64) -> BoxFuture<()> {
        Box::pin(tokio::time::sleep(Duration::from_millis(ms)))
    }

    /// A splitmix64 step over a process-wide counter seeded from the clock: jitter needs spread,
    /// not quality, and this avoids a `rand` dependency.
    fn jitter(&self, bound: u64) -> u64 {
        static STATE: AtomicU64 = AtomicU64::new(0);
        let seed = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        let mut z = STATE.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed) ^ seed;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) % bound.max(1)
    }

    fn spawn(&self, fut: BoxFuture<()>) -> BoxFuture<()> {
        let mut task = AbortOnDrop(tokio::spawn(fut));
        Box::pin(async move {
            if let Err(e) = (&mut task.0).await {
                if e.is_panic() {
                    std::panic::resume_unwind(e.into_panic());
                }
            }
        })
    }

    fn offload(&self, job: Job) -> BoxFuture<()> {
        let handle = tokio::task::spawn_blocking(job);
        Box::pin(async move {
            if let Err(e) = handle.await {
                if e.is_panic() {
                    std::panic::resume_unwind(e.into_panic());
                }
            }
        })
    }
}

/// Wall-clock milliseconds since the Unix epoch.
pub fn wall_ms() -> u64 {
    TokioRuntime.now_ms()
}

/// Gives the allocator's free memory back to the operating system (glibc's `malloc_trim`; nothing
/// elsewhere). Called when a large transient structure was just dropped — the planning catalog and
/// index once the plan is recorded — so that the pages it freed are not kept resident for the
/// rest of the run, under the archive build's own allocations. The `blockwise` binary allocates
/// with jemalloc, which returns freed pages by itself within a second (its background thread;
/// `adapters/cli/src/main.rs`): there this trims only what C code allocated through glibc.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// With `BLOCKWISE_HEAP_TRACE` set, prints the allocator's view of the heap at a named moment of a
/// run to stderr: what a phase holds, against what the allocator keeps. A measuring aid
/// (docs/benchmarks.md), silent otherwise. With jemalloc (the binary's allocator, feature
/// `jemalloc`): `heap <moment>: allocated N MiB, resident N MiB, mapped N MiB`; with glibc:
/// `heap <moment>: in use N MiB, free N MiB, mapped N MiB`.
pub fn heap_trace(moment: &str) {
    if std::env::var_os("BLOCKWISE_HEAP_TRACE").is_none() {
        return;
    }
    let mib = |b: usize| b >> 20;
    #[cfg(feature = "jemalloc")]
    {
        use tikv_jemalloc_ctl::{epoch, stats};
        // The counters are cached until the epoch advances.
        if epoch::advance().is_ok() {
            if let (Ok(a), Ok(r), Ok(m)) = (stats::allocated::read(), stats::resident::read(), stats::mapped::read()) {
                if a > 0 {
                    eprintln!(
                        "heap {moment}: allocated {} MiB, resident {} MiB, mapped {} MiB",
                        mib(a),
                        mib(r),
                        mib(m)
                    );
                    return;
                }
            }
        }
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 only reads the allocator's counters.
        let m = unsafe { libc::mallinfo2() };
        eprintln!(
            "heap {moment}: in use {} MiB, free {} MiB, mapped {} MiB",
            mib(m.uordblks + m.hblkhd),
            mib(m.fordblks),
            mib(m.hblkhd)
        );
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = (moment, mib);
}
