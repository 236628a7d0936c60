//! The node server's stop signal, shared by every task it starts: the gRPC server,
//! open `PushStream` and `WatchAlerts` streams, MQTT connections, replays and the
//! metrics endpoint.
//!
//! A `watch` channel rather than a `Notify`: a task that starts waiting after the
//! signal was raised still sees it, and cloning a receiver is all a new task needs.

use tokio::sync::watch;

/// Raises the signal; dropping it raises it too, so no task outlives its server.
pub(crate) struct ShutdownTrigger(watch::Sender<bool>);

/// Waits for the signal. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Shutdown(watch::Receiver<bool>);

pub(crate) fn channel() -> (ShutdownTrigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (ShutdownTrigger(tx), Shutdown(rx))
}

impl ShutdownTrigger {
    pub(crate) fn fire(&self) {
        self.0.send_replace(true);
    }
}

impl Shutdown {
    /// Returns once the signal is raised (at once if it already was).
    ///
    /// Cancel safety: cancel-safe; use it in `select!` freely.
    pub(crate) async fn fired(&mut self) {
        // An error means the trigger is gone, which counts as the signal.
        let _ = self.0.wait_for(|stop| *stop).await;
    }
}
