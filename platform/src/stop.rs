//! Waiting for a request to stop.

/// Completes when the process is asked to stop: Ctrl-C everywhere; SIGTERM
/// (`systemctl stop`, `kill`) on Unix; on Windows, Ctrl-Break, the console
/// window closing, the user logging off or the system shutting down. A way that
/// cannot be watched is logged and left out.
pub async fn requested() {
    tokio::select! {
        () = ctrl_c() => {}
        () = platform() => {}
    }
}

async fn ctrl_c() {
    if let Err(e) = tokio::signal::ctrl_c().await {
        tracing::warn!(error = %e, "cannot watch for Ctrl-C");
        std::future::pending::<()>().await;
    }
}

#[cfg(unix)]
async fn platform() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            term.recv().await;
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch for SIGTERM");
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(windows)]
async fn platform() {
    use tokio::signal::windows;
    // Each is watched if it can be; one that cannot never completes.
    macro_rules! watched {
        ($what:literal, $listen:expr) => {
            async {
                match $listen {
                    Ok(mut s) => {
                        s.recv().await;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot watch for {}", $what);
                        std::future::pending::<()>().await;
                    }
                }
            }
        };
    }
    tokio::select! {
        () = watched!("Ctrl-Break", windows::ctrl_break()) => {}
        () = watched!("the console closing", windows::ctrl_close()) => {}
        () = watched!("log-off", windows::ctrl_logoff()) => {}
        () = watched!("system shutdown", windows::ctrl_shutdown()) => {}
    }
}

#[cfg(not(any(unix, windows)))]
async fn platform() {
    std::future::pending::<()>().await;
}
