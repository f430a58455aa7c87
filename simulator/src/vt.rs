//! Virtual time: the simulator's [`Runtime`] and the single-threaded executor that drives the
//! production driver on it.
//!
//! [`SimRuntime`] implements the shell's [`Runtime`] port with a virtual clock: `sleep` registers a
//! timer, `spawn` makes a task that runs on its own (polled whenever it is woken, whatever the
//! spawner is doing, as a tokio task would be; dropping its handle aborts it), `offload` runs the
//! job inline, and `jitter` draws from the run's seeded PRNG. [`SimRuntime::run`] polls one root
//! future (the driver) and the woken tasks, in task order, until nothing is runnable, then fires the
//! earliest timer — ties broken by a seeded draw made when the timer was registered — so the whole
//! interleaving of concurrent commands is a function of the seed. Between two timer firings it may
//! decide to crash: the root future is then dropped (and with it every task), exactly as a killed
//! process stops mid-await. Nothing here reads the wall clock or starts a thread.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Wake, Waker};

use blockwise_adapters::world::{BoxFuture, Job, Runtime};

use crate::rng::Rng;

/// A timer's place in the queue: due time, seeded tie-break, registration number.
type TimerKey = (u64, u64, u64);

struct Clock {
    /// Monotonic virtual time: what timers run on.
    now: u64,
    /// Added to `now` for the wall clock the engine stamps events with (clock jumps).
    wall_offset: u64,
    rng: Rng,
    timers: BTreeMap<TimerKey, Option<Waker>>,
    registered: u64,
}

/// A spawned task: its future until it ends, then whether it ended.
struct Task {
    fut: Option<BoxFuture<()>>,
    done: bool,
    join: Option<Waker>,
}

#[derive(Default)]
struct Tasks {
    tasks: BTreeMap<u64, Task>,
    woken: BTreeSet<u64>,
    next: u64,
}

/// Wakes one task by marking it runnable.
struct TaskWaker {
    id: u64,
    tasks: Arc<Mutex<Tasks>>,
}

impl Wake for TaskWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        lock(&self.tasks).woken.insert(self.id);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The simulator's runtime: virtual milliseconds, seeded jitter, one thread.
#[derive(Clone)]
pub struct SimRuntime {
    clock: Arc<Mutex<Clock>>,
    tasks: Arc<Mutex<Tasks>>,
}

/// How [`SimRuntime::run`] ended.
#[derive(Debug)]
pub enum Ended<T> {
    /// The root future completed.
    Done(T),
    /// The crash policy fired: the root future was dropped mid-flight.
    Crashed,
    /// Nothing can make progress (no timer left), or the step budget ran out.
    Stuck(String),
}

impl SimRuntime {
    /// A runtime whose clock starts at `start_ms`, with its own PRNG stream.
    pub fn new(start_ms: u64, rng: Rng) -> SimRuntime {
        let clock = Clock { now: start_ms, wall_offset: 0, rng, timers: BTreeMap::new(), registered: 0 };
        SimRuntime { clock: Arc::new(Mutex::new(clock)), tasks: Arc::default() }
    }

    /// Polls every woken task once, in task order; returns whether any was polled.
    fn run_tasks(&self) -> bool {
        let woken: Vec<u64> = std::mem::take(&mut lock(&self.tasks).woken).into_iter().collect();
        for &id in &woken {
            let fut = lock(&self.tasks).tasks.get_mut(&id).and_then(|t| t.fut.take());
            let Some(mut fut) = fut else { continue };
            let waker = Waker::from(Arc::new(TaskWaker { id, tasks: self.tasks.clone() }));
            let ready = fut.as_mut().poll(&mut Context::from_waker(&waker)).is_ready();
            let mut t = lock(&self.tasks);
            if let Some(task) = t.tasks.get_mut(&id) {
                if ready {
                    task.done = true;
                    if let Some(j) = task.join.take() {
                        j.wake();
                    }
                } else {
                    task.fut = Some(fut);
                }
            }
        }
        !woken.is_empty()
    }

    fn lock(&self) -> MutexGuard<'_, Clock> {
        self.clock.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The monotonic virtual time (timers, records).
    pub fn now(&self) -> u64 {
        self.lock().now
    }

    /// Time passes (timers due meanwhile fire at the next step, in order).
    pub fn pass(&self, ms: u64) {
        self.lock().now += ms;
    }

    /// The wall clock jumps forward (an NTP step): event timestamps move, timers do not, as
    /// tokio's timers run on a monotonic clock.
    pub fn jump_wall(&self, ms: u64) {
        self.lock().wall_offset += ms;
    }

    /// A draw from the runtime's PRNG (the world's randomness, in call order).
    pub fn draw(&self, f: impl FnOnce(&mut Rng) -> u64) -> u64 {
        f(&mut self.lock().rng)
    }

    /// Timers waiting.
    pub fn timers(&self) -> usize {
        self.lock().timers.len()
    }

    /// Polls `root` to completion on virtual time. Before each timer firing (a step),
    /// `crash_now(step)` may stop the run; `crashed()` is asked after every poll too, for crashes
    /// that a fake medium requested mid-poll. At most `steps_max` steps.
    pub fn run<T>(
        &self,
        root: impl Future<Output = T>,
        steps_max: u64,
        mut crash_now: impl FnMut(u64) -> bool,
        crashed: impl Fn() -> bool,
    ) -> Ended<T> {
        let mut root = pin!(root);
        let mut cx = Context::from_waker(Waker::noop());
        let mut step = 0u64;
        loop {
            // Everything runnable runs before time moves on.
            loop {
                if let Poll::Ready(v) = root.as_mut().poll(&mut cx) {
                    if crashed() {
                        return Ended::Crashed;
                    }
                    return Ended::Done(v);
                }
                if crashed() || !self.run_tasks() {
                    break;
                }
            }
            if crashed() {
                return Ended::Crashed;
            }
            step += 1;
            if step > steps_max {
                return Ended::Stuck(format!("no terminal phase after {steps_max} steps"));
            }
            if crash_now(step) {
                return Ended::Crashed;
            }
            let fired = {
                let mut c = self.lock();
                match c.timers.pop_first() {
                    Some(((due, _, _), waker)) => {
                        c.now = c.now.max(due);
                        Some(waker)
                    }
                    None => None,
                }
            };
            match fired {
                Some(Some(w)) => w.wake(),
                Some(None) => {}
                None => return Ended::Stuck("deadlock: the run waits and no timer is pending".into()),
            }
        }
    }
}

/// Waits for a spawned task; dropping it aborts the task (as the shell's tokio runtime does).
struct JoinHandle {
    id: u64,
    tasks: Arc<Mutex<Tasks>>,
}

impl Future for JoinHandle {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut t = lock(&self.tasks);
        match t.tasks.get_mut(&self.id) {
            Some(task) if task.done => Poll::Ready(()),
            Some(task) => {
                task.join = Some(cx.waker().clone());
                Poll::Pending
            }
            None => Poll::Ready(()),
        }
    }
}

impl Drop for JoinHandle {
    fn drop(&mut self) {
        let task = {
            let mut t = lock(&self.tasks);
            t.woken.remove(&self.id);
            t.tasks.remove(&self.id)
        };
        // The task's future is dropped outside the lock: dropping it may record a cancellation.
        drop(task);
    }
}

/// A virtual-time sleep; see [`SimRuntime`].
struct Sleep {
    clock: Arc<Mutex<Clock>>,
    due: u64,
    key: Option<TimerKey>,
    done: bool,
}

impl Future for Sleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.done {
            return Poll::Ready(());
        }
        let this = &mut *self;
        let mut c = this.clock.lock().unwrap_or_else(PoisonError::into_inner);
        match this.key {
            None if this.due <= c.now => {
                drop(c);
                this.done = true;
                Poll::Ready(())
            }
            None => {
                let tie = c.rng.next_u64();
                c.registered += 1;
                let key = (this.due, tie, c.registered);
                c.timers.insert(key, Some(cx.waker().clone()));
                drop(c);
                this.key = Some(key);
                Poll::Pending
            }
            Some(key) => match c.timers.get_mut(&key) {
                Some(slot) => {
                    *slot = Some(cx.waker().clone());
                    Poll::Pending
                }
                None => {
                    drop(c);
                    this.key = None;
                    this.done = true;
                    Poll::Ready(())
                }
            },
        }
    }
}

impl Drop for Sleep {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            self.clock.lock().unwrap_or_else(PoisonError::into_inner).timers.remove(&key);
        }
    }
}

impl Runtime for SimRuntime {
    fn now_ms(&self) -> u64 {
        let c = self.lock();
        c.now + c.wall_offset
    }

    fn sleep(&self, ms: u64) -> BoxFuture<()> {
        let due = self.now().saturating_add(ms);
        Box::pin(Sleep { clock: self.clock.clone(), due, key: None, done: false })
    }

    fn jitter(&self, bound: u64) -> u64 {
        self.lock().rng.below(bound.max(1))
    }

    fn spawn(&self, fut: BoxFuture<()>) -> BoxFuture<()> {
        let id = {
            let mut t = lock(&self.tasks);
            t.next += 1;
            let id = t.next;
            t.tasks.insert(id, Task { fut: Some(fut), done: false, join: None });
            t.woken.insert(id);
            id
        };
        Box::pin(JoinHandle { id, tasks: self.tasks.clone() })
    }

    fn offload(&self, job: Job) -> BoxFuture<()> {
        job();
        Box::pin(std::future::ready(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timers_fire_in_due_order_and_the_clock_follows() {
        let rt = SimRuntime::new(1_000, Rng::new(1));
        let order = Arc::new(Mutex::new(Vec::new()));
        let r2 = rt.clone();
        let o = order.clone();
        let root = async move {
            let a = async {
                r2.sleep(30).await;
                o.lock().unwrap().push(("a", r2.now()));
            };
            let b = async {
                r2.sleep(10).await;
                o.lock().unwrap().push(("b", r2.now()));
                r2.sleep(5).await;
                o.lock().unwrap().push(("b2", r2.now()));
            };
            futures::future::join(a, b).await;
            7
        };
        let ended = rt.run(root, 100, |_| false, || false);
        assert!(matches!(ended, Ended::Done(7)), "{ended:?}");
        assert_eq!(*order.lock().unwrap(), vec![("b", 1010), ("b2", 1015), ("a", 1030)]);
    }

    #[test]
    fn a_dropped_sleep_cancels_its_timer_and_a_lone_wait_is_a_deadlock() {
        let rt = SimRuntime::new(0, Rng::new(2));
        let r2 = rt.clone();
        let root = async move {
            let long = r2.sleep(3_600_000);
            let short = r2.sleep(5);
            futures::future::select(long, short).await;
            r2.now()
        };
        assert!(matches!(rt.run(root, 100, |_| false, || false), Ended::Done(5)));
        assert_eq!(rt.timers(), 0, "the hour-long timer was dropped with its future");
        let r3 = rt.clone();
        let never = async move {
            std::future::pending::<()>().await;
            r3.now()
        };
        assert!(matches!(rt.run(never, 100, |_| false, || false), Ended::Stuck(_)));
    }

    #[test]
    fn same_seed_same_tie_breaks() {
        let run = |seed| {
            let rt = SimRuntime::new(0, Rng::new(seed));
            let r2 = rt.clone();
            let order = Arc::new(Mutex::new(Vec::new()));
            let o = order.clone();
            let root = async move {
                let tasks: Vec<_> = (0..8)
                    .map(|i| {
                        let (r, o) = (r2.clone(), o.clone());
                        async move {
                            r.sleep(10).await;
                            o.lock().unwrap().push(i);
                        }
                    })
                    .collect();
                futures::future::join_all(tasks).await;
            };
            let _ = rt.run(root, 100, |_| false, || false);
            let v = order.lock().unwrap().clone();
            v
        };
        assert_eq!(run(5), run(5));
        assert!((0..20).map(run).collect::<std::collections::BTreeSet<_>>().len() > 1, "ties are drawn, not fixed");
    }
}
