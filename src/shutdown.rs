//! Signals -> ordered stop. The first SIGTERM or SIGINT cancels the shared token:
//! sources stop, the queue drains, the partial batch is scored, then HTTP stops. A
//! second signal, or the deadline passing, exits at once.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Waits for SIGTERM or SIGINT, then cancels `token`; a second signal exits with 130.
pub async fn on_signals(token: CancellationToken, deadline: Duration) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("Cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!(signal = "SIGTERM", "Shutting down"),
        _ = int.recv() => tracing::info!(signal = "SIGINT", "Shutting down"),
        _ = token.cancelled() => return,
    }
    token.cancel();
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
        _ = tokio::time::sleep(deadline) => {
            tracing::error!(deadline_ms = deadline.as_millis() as u64, "Shutdown deadline passed; exiting");
        }
    }
    std::process::exit(130);
}
