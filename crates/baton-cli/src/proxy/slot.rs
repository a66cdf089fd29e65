//! Which proxy thread this is, how many there are, and each thread's
//! one-second tick: the per-thread identity that the pools and the
//! connect timeout use. A leaf: it imports nothing of the proxy.

use std::time::Duration;

use tokio::sync::watch;

/// How many proxy threads run, set once at start.
static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();

thread_local! {
    /// Which proxy thread this is (0 elsewhere).
    static SLOT: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    /// This proxy thread's one-second tick (none elsewhere).
    static TICKS: std::cell::RefCell<Option<watch::Receiver<()>>> =
        const { std::cell::RefCell::new(None) };
}

/// Starts this proxy thread's one-second tick, for coarse deadlines that
/// must not each cost a timer. Within the thread's runtime.
pub fn start_ticks() -> tokio::task::JoinHandle<()> {
    let (tick, ticks) = watch::channel(());
    TICKS.with(|t| *t.borrow_mut() = Some(ticks));
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(1));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            tick.send_replace(());
        }
    })
}

/// The number of proxy threads.
pub fn threads() -> usize {
    *THREADS.get().unwrap_or(&1)
}

/// This proxy thread's index, for per-thread state (connection pools).
pub fn slot() -> usize {
    SLOT.with(std::cell::Cell::get)
}

/// Sets the number of proxy threads, once; returns the number in force.
pub fn init_threads(n: usize) -> usize {
    *THREADS.get_or_init(|| n.max(1))
}

/// Marks the calling thread as proxy thread `index`.
pub fn enter(index: usize) {
    SLOT.with(|s| s.set(index));
}

/// This proxy thread's tick, if it has one.
pub fn ticks() -> Option<watch::Receiver<()>> {
    TICKS.with(|t| t.borrow().clone())
}
