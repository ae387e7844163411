//! The process's CPU cores, shared out between the models' inference calls.
//!
//! whisper.cpp, llama.cpp and ONNX Runtime each run an inference on their own threads, which
//! spin while they wait for each other between layers. Two inferences that together want more
//! threads than there are cores slow each other down far more than running one after the other:
//! the spinning threads burn the time slices the working ones need (measured here: a second
//! call's answer came 2.1–2.7× later than one call alone, with the LLM's first token taking
//! 0.78 s beside a transcription instead of ~0.06 s). So every inference on the CPU takes its
//! cores here first, and waits while they are taken.
//!
//! Waiters are served by deadline, the moment they must start for their result to be ready
//! when it is needed, then in arrival order: a caller's first words go before the rest of
//! another caller's long answer, whose audio is still playing, and after the next piece of an
//! answer whose audio is about to run out. A waiter at the head of the line is not passed by
//! smaller requests behind it, so nobody starves.
//!
//! `GST_DEBUG=voxcpu:5` logs each turn: the thread, how long it waited, how far from its
//! deadline it started, and how long it held the cores.

use std::collections::BTreeSet;
use std::sync::{Condvar, LazyLock, Mutex, MutexGuard, OnceLock};
use std::time::Instant;

static CAT: LazyLock<gst::DebugCategory> = LazyLock::new(|| {
    gst::DebugCategory::new(
        "voxcpu",
        gst::DebugColorFlags::empty(),
        Some("The process's cores, shared out between inferences"),
    )
});

/// Whether turns are logged (GStreamer is initialised, and the category is on).
fn tracing() -> bool {
    // SAFETY: gst_is_initialized has no preconditions.
    let initialized = unsafe { gst::ffi::gst_is_initialized() } != 0;
    initialized && CAT.threshold() >= gst::DebugLevel::Debug
}

fn thread() -> String {
    std::thread::current()
        .name()
        .unwrap_or("a thread")
        .to_string()
}

/// Signed milliseconds from `from` to `to`.
fn ms_between(from: Instant, to: Instant) -> i128 {
    if to >= from {
        (to - from).as_millis() as i128
    } else {
        -((from - to).as_millis() as i128)
    }
}

/// How often a waiter looks whether it was cancelled.
const CANCEL_POLL: std::time::Duration = std::time::Duration::from_millis(10);

/// How long cores given back wait for a waiter that is due before one that is not due yet. One
/// stage hands its result to the next (a transcript to the LLM, the first words to Kokoro) a
/// millisecond or two after it gives its cores back; without this pause a long job queued with a
/// later deadline (the rest of another caller's sentence, a second or more that cannot be taken
/// back) would start in that gap, and the next stage, which someone is waiting for, behind it.
const HANDOFF: std::time::Duration = std::time::Duration::from_millis(20);

/// Where the process's [`Cores`] are kept (see [`Cores::global`]).
const REGISTRY_KEY: &str = "vox-cpu-cores";

/// A set of cores handed out by deadline.
pub struct Cores {
    total: usize,
    /// See [`HANDOFF`].
    handoff: std::time::Duration,
    /// `VOX_CPU_TURNS=off`: everyone runs at once, as the libraries alone would.
    enforced: bool,
    state: Mutex<State>,
    changed: Condvar,
}

struct State {
    /// When cores were last given back.
    freed: Option<Instant>,
    free: usize,
    /// (deadline, ticket) of each waiter; the first is next.
    waiting: BTreeSet<(Instant, u64)>,
    tickets: u64,
}

/// Cores held for one inference call; given back when dropped.
pub struct Turn<'a> {
    cores: &'a Cores,
    held: usize,
    since: Instant,
    /// Given back to an earlier deadline that waits ([`Turn::renew`]), which takes them at
    /// once: no [`HANDOFF`] pause.
    yielded: bool,
}

impl<'a> Turn<'a> {
    /// How many cores this turn holds.
    pub fn cores(&self) -> usize {
        self.held
    }

    /// The same cores for a next step needed by `deadline`, kept unless a waiter's deadline is
    /// earlier; then they are given back and taken again in line ([`Cores::take_unless`]). For
    /// work made of many short steps (an LLM's tokens): giving the cores back after each would
    /// let a long job that waits behind it (a whole sentence of speech) take them in the gap
    /// between two steps, however later its deadline, and hold them for a second or more.
    ///
    /// Cores given back so go to that earlier waiter at once, without the [`HANDOFF`] pause
    /// (which waits for a next stage that is due; the waiter is the one that is due first).
    /// Two replies generated at once take turns token by token; with the pause, each turn
    /// left the cores idle for 20 ms beside a 15 ms step, and the two got ~15 tokens a second
    /// each where they could get ~35.
    pub fn renew(self, deadline: Instant, cancelled: &dyn Fn() -> bool) -> Option<Turn<'a>> {
        let cores = self.cores;
        if !cores.enforced {
            return Some(self);
        }
        let earlier = cores
            .lock()
            .waiting
            .first()
            .is_some_and(|(waiter, _)| *waiter < deadline);
        if !earlier {
            return Some(self);
        }
        let held = self.held;
        let mut yielded = self;
        yielded.yielded = true;
        drop(yielded);
        cores.take_unless(held, deadline, cancelled)
    }
}

impl Cores {
    pub fn new(total: usize) -> Self {
        let total = total.max(1);
        Self {
            total,
            handoff: HANDOFF,
            enforced: true,
            state: Mutex::new(State {
                freed: None,
                free: total,
                waiting: BTreeSet::new(),
                tickets: 0,
            }),
            changed: Condvar::new(),
        }
    }

    /// The process's cores: as many as it may run on (CPU affinity and cgroup quota included).
    ///
    /// Each plugin library carries its own copy of this crate (and of its statics), so the one
    /// instance for the process lives with GStreamer's default registry, a process-wide object:
    /// the first copy to ask creates it under the registry's lock, the others find it there.
    pub fn global() -> &'static Cores {
        static THIS_COPY: OnceLock<&'static Cores> = OnceLock::new();
        THIS_COPY.get_or_init(|| {
            let cores = || -> &'static Cores {
                let n = std::thread::available_parallelism().map_or(1, |n| n.get());
                let mut cores = Cores::new(n);
                cores.enforced = std::env::var("VOX_CPU_TURNS").map_or(true, |v| v != "off");
                Box::leak(Box::new(cores))
            };
            // SAFETY: gst_is_initialized has no preconditions.
            if unsafe { gst::ffi::gst_is_initialized() } == 0 {
                return cores();
            }
            use gst::prelude::*;
            let registry = gst::Registry::get();
            let _lock = registry.object_lock();
            // SAFETY: only this function touches the key, always with a `usize` holding the
            // address of a leaked `Cores`; every copy of this crate is built from the same
            // source by the same compiler, so they agree on its layout.
            unsafe {
                if let Some(address) = registry.data::<usize>(REGISTRY_KEY) {
                    return &*(*address.as_ptr() as *const Cores);
                }
                let created = cores();
                registry.set_data::<usize>(REGISTRY_KEY, created as *const Cores as usize);
                created
            }
        })
    }

    pub fn total(&self) -> usize {
        self.total
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until `wanted` cores (at least one, at most all) are free and every waiter with
    /// an earlier deadline has had its turn, then holds them.
    pub fn take(&self, wanted: usize, deadline: Instant) -> Turn<'_> {
        self.take_unless(wanted, deadline, &|| false)
            .expect("a wait that cannot be cancelled")
    }

    /// [`Self::take`], but gives up (`None`) as soon as `cancelled()` says so while waiting: a
    /// flushed synthesis or a cancelled reply does not keep its place in the line.
    pub fn take_unless(
        &self,
        wanted: usize,
        deadline: Instant,
        cancelled: &dyn Fn() -> bool,
    ) -> Option<Turn<'_>> {
        if !self.enforced {
            return Some(Turn {
                cores: self,
                held: 0,
                since: Instant::now(),
                yielded: false,
            });
        }
        let held = wanted.clamp(1, self.total);
        let asked = Instant::now();
        let mut state = self.lock();
        let ticket = (deadline, state.tickets);
        state.tickets += 1;
        state.waiting.insert(ticket);
        loop {
            let now = Instant::now();
            // Not due yet: cores just given back wait a moment for the next stage of a reply.
            let handoff_left = state
                .freed
                .filter(|_| deadline > now)
                .map_or(std::time::Duration::ZERO, |freed| {
                    (freed + self.handoff).saturating_duration_since(now)
                });
            if state.waiting.first() == Some(&ticket)
                && state.free >= held
                && handoff_left.is_zero()
            {
                break;
            }
            if cancelled() {
                state.waiting.remove(&ticket);
                drop(state);
                // Those behind it may go now.
                self.changed.notify_all();
                return None;
            }
            let wait = if handoff_left.is_zero() {
                CANCEL_POLL
            } else {
                handoff_left.min(CANCEL_POLL)
            };
            state = match self.changed.wait_timeout(state, wait) {
                Ok((state, _)) => state,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        state.waiting.remove(&ticket);
        state.free -= held;
        drop(state);
        // The next in line may fit in the cores left.
        self.changed.notify_all();
        let since = Instant::now();
        if tracing() {
            gst::debug!(
                CAT,
                "{}: {held} core(s) after waiting {} ms, {} ms after its deadline",
                thread(),
                (since - asked).as_millis(),
                ms_between(deadline, since)
            );
        }
        Some(Turn {
            cores: self,
            held,
            since,
            yielded: false,
        })
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        if self.held == 0 {
            return;
        }
        if tracing() {
            gst::debug!(
                CAT,
                "{}: {} core(s) back after {} ms",
                thread(),
                self.held,
                self.since.elapsed().as_millis()
            );
        }
        let mut state = self.cores.lock();
        state.free += self.held;
        // A yielded turn leaves another's recent hand-off pause as it is.
        if !self.yielded {
            state.freed = Some(Instant::now());
        }
        drop(state);
        self.cores.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    /// Starts a thread that takes `wanted` cores with `deadline` and records its order.
    fn waiter(
        cores: &Arc<Cores>,
        order: &Arc<Mutex<Vec<&'static str>>>,
        name: &'static str,
        wanted: usize,
        deadline: Instant,
    ) -> std::thread::JoinHandle<()> {
        let (cores, order) = (cores.clone(), order.clone());
        std::thread::spawn(move || {
            let _turn = cores.take(wanted, deadline);
            order.lock().unwrap().push(name);
            std::thread::sleep(Duration::from_millis(20));
        })
    }

    #[test]
    fn a_renewed_turn_is_kept_until_an_earlier_deadline_waits() {
        let cores = Arc::new(Cores::new(2));
        let now = Instant::now();
        let order = Arc::new(Mutex::new(Vec::new()));
        let turn = cores.take(2, now);
        // A later deadline waits: the turn is renewed without giving the cores back.
        let later = waiter(&cores, &order, "later", 2, now + Duration::from_secs(5));
        until_waiting(&cores, 1);
        let turn = turn.renew(now + Duration::from_secs(1), &|| false).unwrap();
        assert_eq!(turn.cores(), 2);
        assert_eq!(cores.lock().free, 0);
        assert!(order.lock().unwrap().is_empty());
        // A next step due after the waiter's deadline lets it go first.
        let turn = turn.renew(now + Duration::from_secs(9), &|| false).unwrap();
        assert_eq!(*order.lock().unwrap(), ["later"]);
        assert_eq!(turn.cores(), 2);
        drop(turn);
        later.join().unwrap();
    }

    #[test]
    fn a_turn_renewed_for_an_earlier_waiter_hands_over_at_once() {
        let mut cores = Cores::new(2);
        // Long enough that a handover that waited for it could not pass for one that did not.
        cores.handoff = Duration::from_millis(500);
        let cores = Arc::new(cores);
        let now = Instant::now();
        let turn = cores.take(2, now);
        // Another reply's next token, not due yet but before this one's next.
        let taken = Arc::new(Mutex::new(None::<Instant>));
        let other = {
            let (cores, taken) = (cores.clone(), taken.clone());
            std::thread::spawn(move || {
                let _turn = cores.take(2, now + Duration::from_secs(1));
                *taken.lock().unwrap() = Some(Instant::now());
                std::thread::sleep(Duration::from_millis(20));
            })
        };
        until_waiting(&cores, 1);
        let yielded = Instant::now();
        let turn = turn.renew(now + Duration::from_secs(2), &|| false).unwrap();
        let took = taken.lock().unwrap().expect("the other waiter went first") - yielded;
        assert!(
            took < Duration::from_millis(300),
            "handed over after {took:?}"
        );
        drop(turn);
        other.join().unwrap();
    }

    #[test]
    fn cores_given_back_wait_a_moment_for_a_waiter_that_is_due() {
        let mut cores = Cores::new(2);
        // Long enough that a loaded machine cannot make the test flaky.
        cores.handoff = Duration::from_millis(300);
        let cores = Arc::new(cores);
        let order = Arc::new(Mutex::new(Vec::new()));
        let turn = cores.take(2, Instant::now());
        let later = waiter(
            &cores,
            &order,
            "not due",
            2,
            Instant::now() + Duration::from_secs(5),
        );
        until_waiting(&cores, 1);
        drop(turn);
        // The next stage asks just after the cores came back, and goes first.
        std::thread::sleep(Duration::from_millis(5));
        let due = waiter(&cores, &order, "due", 2, Instant::now());
        due.join().unwrap();
        later.join().unwrap();
        assert_eq!(*order.lock().unwrap(), ["due", "not due"]);
        // With no one else, a waiter not due yet still goes once the moment has passed.
        let started = Instant::now();
        drop(cores.take(2, Instant::now() + Duration::from_secs(5)));
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    /// Waits until `n` threads are queued on `cores`.
    fn until_waiting(cores: &Cores, n: usize) {
        for _ in 0..500 {
            if cores.lock().waiting.len() == n {
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        panic!("{n} waiters never queued");
    }

    #[test]
    fn waiters_go_by_deadline_then_arrival() {
        let cores = Arc::new(Cores::new(2));
        let order = Arc::new(Mutex::new(Vec::new()));
        let now = Instant::now();
        let busy = cores.take(2, now);
        let late = waiter(&cores, &order, "late", 2, now + Duration::from_secs(2));
        until_waiting(&cores, 1);
        let first = waiter(&cores, &order, "urgent-1", 2, now);
        until_waiting(&cores, 2);
        let second = waiter(&cores, &order, "urgent-2", 2, now);
        until_waiting(&cores, 3);
        drop(busy);
        for t in [late, first, second] {
            t.join().unwrap();
        }
        assert_eq!(*order.lock().unwrap(), ["urgent-1", "urgent-2", "late"]);
    }

    #[test]
    fn small_turns_share_the_cores_and_the_head_of_the_line_is_not_passed() {
        let cores = Arc::new(Cores::new(2));
        let now = Instant::now();
        // Two one-core turns run side by side.
        let a = cores.take(1, now);
        let b = cores.take(1, now);
        assert_eq!(cores.lock().free, 0);
        // A two-core waiter is first in line; a one-core waiter behind it must not pass it
        // when one core comes free.
        let order = Arc::new(Mutex::new(Vec::new()));
        let big = waiter(&cores, &order, "big", 2, now);
        until_waiting(&cores, 1);
        let small = waiter(&cores, &order, "small", 1, now + Duration::from_millis(1));
        until_waiting(&cores, 2);
        drop(a);
        std::thread::sleep(Duration::from_millis(30));
        assert!(order.lock().unwrap().is_empty(), "a waiter passed the head");
        drop(b);
        big.join().unwrap();
        small.join().unwrap();
        assert_eq!(*order.lock().unwrap(), ["big", "small"]);
        assert_eq!(cores.lock().free, 2);
    }

    #[test]
    fn the_process_wide_cores_live_with_the_registry() {
        gst::init().unwrap();
        let cores = Cores::global();
        // Another copy of this crate (another plugin) finds the same instance by the key.
        use gst::prelude::*;
        let registry = gst::Registry::get();
        let found = unsafe { registry.data::<usize>(REGISTRY_KEY) }.expect("stored");
        assert_eq!(unsafe { *found.as_ptr() }, cores as *const Cores as usize);
        assert_eq!(
            cores.total(),
            std::thread::available_parallelism().unwrap().get()
        );
    }

    #[test]
    fn a_cancelled_waiter_leaves_the_line_and_the_next_goes() {
        let cores = Arc::new(Cores::new(1));
        let now = Instant::now();
        let busy = cores.take(1, now);
        let cancel = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let first = {
            let (cores, cancel) = (cores.clone(), cancel.clone());
            std::thread::spawn(move || {
                cores
                    .take_unless(1, now, &|| cancel.load(Ordering::SeqCst))
                    .is_some()
            })
        };
        until_waiting(&cores, 1);
        let order = Arc::new(Mutex::new(Vec::new()));
        let second = waiter(&cores, &order, "second", 1, now + Duration::from_secs(1));
        until_waiting(&cores, 2);
        cancel.store(true, Ordering::SeqCst);
        assert!(!first.join().unwrap(), "the cancelled waiter got the core");
        until_waiting(&cores, 1);
        drop(busy);
        second.join().unwrap();
        assert_eq!(*order.lock().unwrap(), ["second"]);
        assert_eq!(cores.lock().free, 1);
    }

    #[test]
    fn requests_are_clamped_to_the_cores_there_are() {
        let cores = Cores::new(2);
        let t = cores.take(8, Instant::now());
        assert_eq!(t.cores(), 2);
        drop(t);
        assert_eq!(cores.take(0, Instant::now()).cores(), 1);
    }

    #[test]
    fn never_more_cores_in_use_than_there_are() {
        let cores = Arc::new(Cores::new(3));
        let in_use = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..12)
            .map(|i| {
                let (cores, in_use, peak) = (cores.clone(), in_use.clone(), peak.clone());
                std::thread::spawn(move || {
                    let wanted = 1 + i % 3;
                    let _turn = cores.take(wanted, Instant::now());
                    let now = in_use.fetch_add(wanted, Ordering::SeqCst) + wanted;
                    peak.fetch_max(now, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(5));
                    in_use.fetch_sub(wanted, Ordering::SeqCst);
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(peak.load(Ordering::SeqCst) <= 3);
        assert_eq!(cores.lock().free, 3);
    }
}
