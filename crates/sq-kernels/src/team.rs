//! A spinning team of helper threads for decode-sized work.
//!
//! One decoded token runs a few hundred small products (each a few to a few tens of
//! microseconds). Handing those to rayon costs more than it saves: rayon's idle workers go to
//! sleep, and waking a sleeping thread (on a virtual machine, a halted vCPU) takes tens of
//! microseconds. The team's helpers instead spin on an epoch counter for a short while after each
//! job ([`SPIN`]), so back-to-back jobs of one decode step start within nanoseconds; idle longer
//! than that, they park and cost nothing.
//!
//! [`run_parts`] runs `f(0..parts)` on the calling thread plus up to `threads - 1` helpers, the
//! parts claimed one at a time from a shared counter. Which thread runs a part never changes
//! what it computes, so results are bit for bit those of a serial loop.

use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle helper spins before it parks.
const SPIN: Duration = Duration::from_millis(3);
/// How long the caller spins for helpers still inside a finished job before it blocks.
const WAIT_SPIN: Duration = Duration::from_micros(30);
/// Helpers at most (the team serves decode on a few cores).
const MAX_HELPERS: usize = 15;

/// One job, on the stack of the thread that runs [`run_parts`]. Helpers touch it only while
/// they are counted in `Team::entered` for its epoch.
struct Job<'a> {
    f: &'a (dyn Fn(usize) + Sync),
    parts: usize,
    next: AtomicUsize,
    /// Helpers allowed in (the caller's thread budget minus itself).
    seats: AtomicUsize,
}

struct Team {
    helpers: usize,
    /// Epoch of the latest job; helpers wait for it to change.
    epoch: AtomicUsize,
    /// Epoch of the latest job closed to new helpers.
    closed: AtomicUsize,
    /// Helpers inside the current job.
    entered: AtomicUsize,
    job: AtomicPtr<Job<'static>>,
    /// One caller at a time; others run their parts serially.
    busy: AtomicBool,
    panicked: AtomicBool,
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
    /// The caller blocks on `done` (set while it does).
    waiting: AtomicBool,
    done: Condvar,
    /// Microseconds since [`epoch_start`] before which callers run serially (see [`STALL`]).
    serial_until_us: AtomicU64,
}

thread_local! {
    static IN_TEAM: Cell<bool> = const { Cell::new(false) };
}

fn team() -> &'static Team {
    static TEAM: OnceLock<&'static Team> = OnceLock::new();
    TEAM.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let team: &'static Team = Box::leak(Box::new(Team {
            helpers: cores.saturating_sub(1).min(MAX_HELPERS),
            epoch: AtomicUsize::new(0),
            closed: AtomicUsize::new(0),
            entered: AtomicUsize::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            busy: AtomicBool::new(false),
            panicked: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
            waiting: AtomicBool::new(false),
            done: Condvar::new(),
            serial_until_us: AtomicU64::new(0),
        }));
        for i in 0..team.helpers {
            // A helper that cannot be spawned only leaves its seat empty.
            let _ = std::thread::Builder::new()
                .name(format!("sq-team-{i}"))
                .spawn(move || helper(team));
        }
        team
    })
}

fn helper(team: &'static Team) {
    IN_TEAM.with(|c| c.set(true));
    let mut seen = 0usize;
    loop {
        // Wait for a new epoch: spin, then park.
        let mut idle_since = Instant::now();
        let mut spins = 0u32;
        let e = loop {
            let e = team.epoch.load(SeqCst);
            if e != seen {
                break e;
            }
            std::hint::spin_loop();
            spins += 1;
            if spins.is_multiple_of(1024) && idle_since.elapsed() > SPIN {
                let mut guard = team.lock.lock().unwrap_or_else(|p| p.into_inner());
                team.sleepers.fetch_add(1, SeqCst);
                while team.epoch.load(SeqCst) == seen {
                    guard = team.wake.wait(guard).unwrap_or_else(|p| p.into_inner());
                }
                team.sleepers.fetch_sub(1, SeqCst);
                drop(guard);
                idle_since = Instant::now();
            }
        };
        seen = e;
        team.entered.fetch_add(1, SeqCst);
        // Dekker with the caller's close-then-read-entered: past this check the caller is still
        // inside job `e`, so the pointer is that job's and stays valid until `entered` drops.
        if team.closed.load(SeqCst) < e && team.epoch.load(SeqCst) == e {
            // SAFETY: see above; the job outlives our membership in `entered`.
            let job = unsafe { &*team.job.load(SeqCst) };
            let seated = job
                .seats
                .fetch_update(SeqCst, SeqCst, |s| s.checked_sub(1))
                .is_ok();
            if seated {
                loop {
                    let i = job.next.fetch_add(1, SeqCst);
                    if i >= job.parts {
                        break;
                    }
                    if catch_unwind(AssertUnwindSafe(|| (job.f)(i))).is_err() {
                        team.panicked.store(true, SeqCst);
                    }
                }
            }
        }
        if team.entered.fetch_sub(1, SeqCst) == 1 && team.waiting.load(SeqCst) {
            let _guard = team.lock.lock().unwrap_or_else(|p| p.into_inner());
            team.done.notify_all();
        }
    }
}

/// Waits until no helper is inside the closed job: spins briefly, then blocks, so that a helper
/// preempted by another process (a loaded machine) can run on this core instead of being waited
/// for by a spinning thread.
fn wait_for_helpers(team: &Team, start: Instant) {
    let mut spins = 0u32;
    while team.entered.load(SeqCst) != 0 {
        std::hint::spin_loop();
        spins += 1;
        if spins.is_multiple_of(256) && start.elapsed() > WAIT_SPIN {
            let mut guard = team.lock.lock().unwrap_or_else(|p| p.into_inner());
            team.waiting.store(true, SeqCst);
            while team.entered.load(SeqCst) != 0 {
                guard = team
                    .done
                    .wait_timeout(guard, Duration::from_millis(1))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            team.waiting.store(false, SeqCst);
            break;
        }
    }
    let waited = start.elapsed();
    if waited > STALL {
        // A helper was preempted mid-part (another process wants this core): run serially for
        // a while rather than stall every product on it.
        let until = epoch_start().elapsed() + BACKOFF;
        team.serial_until_us
            .store(until.as_micros() as u64, Relaxed);
    }
}

/// A wait for helpers longer than this means one was preempted.
const STALL: Duration = Duration::from_micros(200);
/// How long the team then stays serial.
const BACKOFF: Duration = Duration::from_millis(50);

fn epoch_start() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

/// Runs `f(i)` for every `i` in `0..parts` on the calling thread and up to `threads - 1`
/// spinning helpers; returns when every part has run. Runs serially when `threads` or `parts`
/// is 1, when called from inside a team job, or while another thread holds the team.
///
/// # Panics
/// When `f` panicked on a helper (a panic on the calling thread propagates as usual).
pub fn run_parts(parts: usize, threads: usize, f: &(dyn Fn(usize) + Sync)) {
    let serial = || (0..parts).for_each(f);
    if parts <= 1 || threads <= 1 || IN_TEAM.with(Cell::get) {
        return serial();
    }
    let team = team();
    if team.helpers == 0
        || (epoch_start().elapsed().as_micros() as u64) < team.serial_until_us.load(Relaxed)
        || team
            .busy
            .compare_exchange(false, true, Acquire, Relaxed)
            .is_err()
    {
        return serial();
    }
    let job = Job {
        f,
        parts,
        next: AtomicUsize::new(0),
        seats: AtomicUsize::new((threads - 1).min(team.helpers)),
    };
    let e = team.epoch.load(SeqCst) + 1;
    // SAFETY (lifetime): helpers read the job only while counted in `entered` for epoch `e`,
    // and this function waits for `entered` to drain after closing `e`.
    team.job
        .store(&job as *const Job<'_> as *mut Job<'static>, SeqCst);
    team.epoch.store(e, SeqCst);
    if team.sleepers.load(SeqCst) > 0 {
        let _guard = team.lock.lock().unwrap_or_else(|p| p.into_inner());
        team.wake.notify_all();
    }
    // Our own share; a panic here must still close the job before unwinding.
    let mine = catch_unwind(AssertUnwindSafe(|| loop {
        let i = job.next.fetch_add(1, SeqCst);
        if i >= parts {
            break;
        }
        f(i);
    }));
    let closed_at = Instant::now();
    team.closed.store(e, SeqCst);
    wait_for_helpers(team, closed_at);
    let helper_panicked = team.panicked.swap(false, SeqCst);
    team.busy.store(false, Release);
    if let Err(p) = mine {
        std::panic::resume_unwind(p);
    }
    assert!(!helper_panicked, "a team helper panicked");
}

/// [`run_parts`] over the `chunk`-sized pieces of `out` (the last may be shorter):
/// `f(index, piece)`.
pub fn run_chunks_mut<T: Send>(
    out: &mut [T],
    chunk: usize,
    threads: usize,
    f: &(dyn Fn(usize, &mut [T]) + Sync),
) {
    let chunk = chunk.max(1);
    let len = out.len();
    let base = SendPtr(out.as_mut_ptr());
    run_parts(len.div_ceil(chunk), threads, &|i| {
        let start = i * chunk;
        let n = chunk.min(len - start);
        let base = &base;
        // SAFETY: every index runs once, so the pieces handed out are disjoint and inside `out`,
        // which stays borrowed until `run_parts` returns.
        let piece = unsafe { std::slice::from_raw_parts_mut(base.0.add(start), n) };
        f(i, piece)
    });
}

struct SendPtr<T>(*mut T);
// SAFETY: used only to hand out disjoint pieces of one slice (see `run_chunks_mut`).
unsafe impl<T: Send> Send for SendPtr<T> {}
unsafe impl<T: Send> Sync for SendPtr<T> {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_part_runs_exactly_once() {
        for (parts, threads) in [(0, 2), (1, 2), (7, 1), (7, 2), (1000, 2), (64, 16)] {
            let hits: Vec<AtomicUsize> = (0..parts).map(|_| AtomicUsize::new(0)).collect();
            for _ in 0..50 {
                run_parts(parts, threads, &|i| {
                    hits[i].fetch_add(1, SeqCst);
                });
            }
            assert!(
                hits.iter().all(|h| h.load(SeqCst) == 50),
                "{parts} {threads}"
            );
        }
    }

    #[test]
    fn chunks_cover_the_slice() {
        let mut v = vec![0usize; 103];
        run_chunks_mut(&mut v, 10, 2, &|i, c| {
            for x in c.iter_mut() {
                *x += i + 1;
            }
        });
        assert!(v.iter().enumerate().all(|(j, &x)| x == j / 10 + 1));
    }

    #[test]
    fn concurrent_and_nested_callers_fall_back_to_serial() {
        let total = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..100 {
                        run_parts(8, 2, &|_| {
                            run_parts(3, 2, &|_| {
                                total.fetch_add(1, SeqCst);
                            });
                        });
                    }
                });
            }
        });
        assert_eq!(total.load(SeqCst), 4 * 100 * 8 * 3);
    }
}
