//! The patterns long-running commands share: run a library entry point on a blocking
//! thread (training and evaluation hold a core for minutes and must not stall the async
//! runtime), name what was being done when it fails, print the result as one JSON
//! object on stdout, and stop in order on Ctrl-C or SIGTERM.

use anyhow::Context;
use serde::Serialize;

/// Runs `work` on a blocking thread; its error, or the thread's panic, comes back with
/// `what` as context ("evaluating on SKAB").
pub async fn blocking<T, E>(
    what: &'static str,
    work: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> anyhow::Result<T>
where
    T: Send + 'static,
    E: Into<anyhow::Error> + Send + 'static,
{
    tokio::task::spawn_blocking(work)
        .await
        .with_context(|| format!("the task {what}"))?
        .map_err(Into::into)
        .context(what)
}

/// Prints `report` as one line of JSON on stdout: the machine-readable result every
/// `eval`, `bench` and `train` run ends with.
pub fn print_json(report: &impl Serialize) -> anyhow::Result<()> {
    println!(
        "{}",
        serde_json::to_string(report).context("writing the report as JSON")?
    );
    Ok(())
}

/// Resolves on Ctrl-C from a terminal or SIGTERM from systemd or a container runtime.
/// SIGTERM is caught from the moment this returns, before the future is first polled.
pub fn stop_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("listening for SIGTERM")?;
    Ok(async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
    })
}
