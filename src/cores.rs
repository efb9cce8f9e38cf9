//! `server.thread_per_core`: one thread per core, each with a current-thread tokio runtime and, for every
//! listener, a listening socket of its own on the same address (`SO_REUSEPORT`: the kernel spreads new
//! connections over the sockets). A connection lives its whole life on the thread that accepted it, so its
//! wake-ups (a reply read, the upstream's answer, a timer) never cross threads: no worker parked and woken
//! by another per message, as in tokio's work-stealing runtime (`thread_per_core = false`).
//!
//! Everything else is shared as before (admission counts, the upstream pool, rules, the state store, the
//! audit writer) and background work (watchers, metrics, the pool's reaper) stays on the main runtime. The
//! upstream pool prefers a connection opened on the asking thread ([`home`]), whose socket that thread's
//! runtime polls; one from another thread is moved to the asking thread's runtime when taken
//! (`upstream::Connection::rehome`).
//!
//! What it costs: a connection cannot move to an idle core, so one heavy message (a large MIME scan runs on
//! the blocking pool, but decoding and relaying do not) delays the other connections of its thread, and the
//! kernel's spreading is by hash, not by load.

use std::cell::Cell;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{debug, error};

thread_local! {
    static HOME: Cell<u32> = const { Cell::new(0) };
}

/// The thread this code runs on: `1..=n` on a per-core thread, 0 anywhere else (the main runtime, or every
/// thread of the default runtime, where the distinction means nothing).
pub fn home() -> u32 {
    HOME.with(Cell::get)
}

/// How many per-core threads: one per core moat may run on.
pub fn count() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}

/// Binds `n` listening sockets to `addr` with `SO_REUSEPORT`. Each socket is deregistered from the calling
/// runtime, to be registered again by the thread that accepts on it.
///
/// `SO_REUSEPORT` alone would let a second moat (or any process of the same user that sets it) bind the same
/// address and silently take a share of the connections. So the address is first bound without it: that
/// fails with "address in use" when anything listens there, as a plain bind would. It also picks the port
/// when `addr` has port 0.
pub fn bind(addr: SocketAddr, n: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    let socket_for = |a: SocketAddr| {
        let s = if a.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
        s.set_reuseaddr(true)?;
        Ok::<_, std::io::Error>(s)
    };
    let probe = socket_for(addr)?;
    probe.bind(addr)?;
    let mut at = probe.local_addr()?;
    drop(probe);
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let socket = socket_for(at)?;
        socket.set_reuseport(true)?;
        socket.bind(at)?;
        let listener = socket.listen(1024)?;
        at = listener.local_addr()?;
        out.push(listener.into_std()?);
    }
    Ok(out)
}

/// How often each per-core runtime wakes up on its own (see [`Cores::start`]).
const TICK: Duration = Duration::from_secs(1);

/// A task for a per-core thread, made on that thread (inside its runtime, so sockets register there).
pub type Work = Box<dyn FnOnce() -> Vec<Pin<Box<dyn Future<Output = ()> + Send>>> + Send>;

/// The running per-core threads. Dropping it stops them without waiting; [`Cores::stop`] waits.
pub struct Cores {
    stop: CancellationToken,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Cores {
    /// Starts one thread per entry of `work`, each running its tasks on a runtime of its own until
    /// [`Cores::stop`]. Tasks they spawn (connections) run on the same thread.
    pub fn start(work: Vec<Work>) -> std::io::Result<Cores> {
        let stop = CancellationToken::new();
        let mut cores = Cores { stop: stop.clone(), threads: Vec::with_capacity(work.len()) };
        for (i, make) in work.into_iter().enumerate() {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let stop = stop.clone();
            let home = u32::try_from(i + 1).unwrap_or(u32::MAX);
            let thread = std::thread::Builder::new().name(format!("moat-core-{i}")).spawn(move || {
                HOME.with(|h| h.set(home));
                runtime.block_on(async move {
                    for task in make() {
                        tokio::spawn(task);
                    }
                    // tokio's timer wheel wakes the I/O driver (an eventfd write, even from the driver's own
                    // thread) whenever a new timer is due before the earliest one it is waiting for. With
                    // this tick pending, that is never a session's timeouts (seconds at least), so a message
                    // costs no such write; the tick itself is one wake-up a second.
                    let mut tick = tokio::time::interval(TICK);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    loop {
                        tokio::select! {
                            _ = stop.cancelled() => break,
                            _ = tick.tick() => {}
                        }
                    }
                });
                // Whatever is left was cut off by the drain; blocking work (a hashing, a lookup) is not
                // waited for long.
                runtime.shutdown_timeout(Duration::from_secs(1));
                debug!(core = i, "core thread stopped");
            })?;
            cores.threads.push(thread);
        }
        Ok(cores)
    }

    /// Stops every thread (after the drain: their connections are done or cut off) and waits for them.
    pub async fn stop(mut self) {
        self.stop.cancel();
        let threads = std::mem::take(&mut self.threads);
        let joined = tokio::task::spawn_blocking(move || {
            for t in threads {
                if t.join().is_err() {
                    error!("a core thread panicked");
                }
            }
        });
        let _ = joined.await;
    }
}

impl Drop for Cores {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
