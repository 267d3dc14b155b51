//! Logs go to stderr or to the configured `logFile`, never to stdout (which is the result).
use std::{fs::OpenOptions, path::Path, sync::Mutex};

pub fn init(file: Option<&Path>) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WEIR_CNI_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_target(false);
    let opened = file.and_then(|p| OpenOptions::new().create(true).append(true).open(p).ok());
    let _ = match opened {
        Some(f) => b.with_writer(Mutex::new(f)).try_init(),
        None => b.with_writer(std::io::stderr).try_init(),
    };
}
