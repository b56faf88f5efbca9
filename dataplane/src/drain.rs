//! Graceful exit: on SIGTERM (or after handing its listening socket to a
//! new sidecar on SIGQUIT) the sidecar stops accepting, lets the requests
//! and streams in flight finish within a grace period, then exits 0.
//!
//! pingora does the stopping: its accept loops end and the listening socket
//! closes, connections idle between requests are closed, and requests that
//! begin afterwards are answered with `Connection: close`. What it does not
//! do is wait for the requests in flight: after the signal it sleeps its
//! whole `grace_period_seconds` however little is left, then drops every
//! task still running. So the sidecar counts its requests itself and exits
//! as soon as none is left, or when the grace period is over; pingora's own
//! sleep is only the backstop.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use pingora::server::ExecutionPhase;
use tokio::sync::broadcast;

/// Requests between `new_ctx` and the end of `logging`, in the whole process.
static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);
/// Set once the process was told to go: answers then close their connection.
static DRAINING: AtomicBool = AtomicBool::new(false);

/// How often the drain looks at the count. A drain happens once per
/// process life; a short poll is simpler than waking on every request end.
const POLL: Duration = Duration::from_millis(10);
/// How long the count must stay at zero before the process exits. A
/// connection accepted just before the listener closed can still be
/// between its headers and `new_ctx`, not yet counted; pingora drops the
/// ones whose headers are not complete at once, so a short wait covers the
/// rest.
const SETTLE: Duration = Duration::from_millis(100);

/// One request in flight; counted while it lives (it lives in the request's
/// context, which pingora drops once the answer is written and logged).
#[derive(Debug)]
pub struct InFlight(());

impl InFlight {
    pub fn enter() -> Self {
        IN_FLIGHT.fetch_add(1, Ordering::Relaxed);
        Self(())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        IN_FLIGHT.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Requests in flight now.
pub fn in_flight() -> usize {
    IN_FLIGHT.load(Ordering::Relaxed)
}

/// Whether the process is on its way out.
pub fn draining() -> bool {
    DRAINING.load(Ordering::Relaxed)
}

/// Makes an answer whose headers are about to go out close its connection
/// when the process is on its way out, so the app opens its next request on
/// a new connection (to the new sidecar, after a handoff) instead of
/// reusing one that is about to close under it.
pub fn close_if_draining(session: &mut pingora::proxy::Session) {
    if draining() {
        session.set_keepalive(None);
    }
}

/// Follows pingora's execution phases on a thread of its own and ends the
/// process once the drain is over; returns at once (the thread is detached).
pub fn spawn(
    mut phases: broadcast::Receiver<ExecutionPhase>,
    grace: Duration,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("switchyard-drain".into())
        .spawn(move || loop {
            match phases.blocking_recv() {
                Ok(ExecutionPhase::GracefulTerminate) => {
                    DRAINING.store(true, Ordering::Relaxed);
                    tracing::info!(
                        in_flight = in_flight(),
                        grace_ms = grace.as_millis() as u64,
                        "SIGTERM: no longer accepting; letting requests in flight finish"
                    );
                }
                Ok(ExecutionPhase::GracefulUpgradeTransferringFds) => {
                    DRAINING.store(true, Ordering::Relaxed);
                    tracing::info!("SIGQUIT: handing the listening socket to the new sidecar");
                }
                Ok(ExecutionPhase::ShutdownGracePeriod) => {
                    DRAINING.store(true, Ordering::Relaxed);
                    finish(grace);
                }
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return,
            }
        })
        .map(drop)
}

/// Waits for the requests in flight, at most `grace`, then exits 0: the
/// process was asked to go and went, whether or not every request made it.
fn finish(grace: Duration) {
    let start = Instant::now();
    let end = start.checked_add(grace).unwrap_or(start);
    let mut zero_since: Option<Instant> = None;
    loop {
        let now = Instant::now();
        let left = in_flight();
        if left == 0 {
            let since = *zero_since.get_or_insert(now);
            if now.duration_since(since) >= SETTLE {
                tracing::info!("drained: every request in flight finished; exiting");
                break;
            }
        } else {
            zero_since = None;
        }
        if now >= end {
            tracing::warn!(
                cut = left,
                grace_ms = grace.as_millis() as u64,
                "grace period over; exiting with requests still in flight"
            );
            break;
        }
        std::thread::sleep(POLL);
    }
    // Nothing is left to flush: answers are written before their request
    // stops counting, and logs go to stderr unbuffered. The control plane
    // client's thread ends with the process.
    std::process::exit(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_counts_while_its_guard_lives() {
        let before = in_flight();
        let a = InFlight::enter();
        let b = InFlight::enter();
        assert_eq!(in_flight(), before + 2);
        drop(a);
        drop(b);
        // Only request contexts make guards, and no other unit test makes one.
        assert_eq!(in_flight(), before);
    }
}
