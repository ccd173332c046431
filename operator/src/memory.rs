//! Gives freed heap back to the OS. A big job (thousands of pods in the watch caches,
//! thousands of requests) leaves glibc's per-thread arenas full of free pages that it
//! keeps for reuse, so RSS stays at the peak after the job is gone; trimming now and
//! then brings it back near the baseline at the cost of a few microseconds.

use std::time::Duration;

const EVERY: Duration = Duration::from_secs(10);

/// Trims the heap every few seconds until the runtime stops.
pub fn spawn_trimmer() -> tokio::task::JoinHandle<()> {
    tokio::spawn(async {
        let mut tick = tokio::time::interval(EVERY);
        loop {
            tick.tick().await;
            trim();
        }
    })
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() {
    // SAFETY: malloc_trim only walks glibc's own arenas; 0 keeps no extra padding.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}
