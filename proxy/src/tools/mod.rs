//! The tools people run beside the agent: `weir loadtest` and the backend it speaks to (`weir
//! echo-server`), `weir status`, and `weir sandbox` with the simulated node it builds (`sim`).
use anyhow::{Context, Result};

pub mod echo;
pub mod loadtest;
pub mod sandbox;
pub mod sim;
pub mod status;

/// Pins the calling process (all threads started after this) to one CPU.
pub fn pin_to_cpu(cpu: usize) -> Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu).with_context(|| format!("CPU {cpu}"))?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
        .with_context(|| format!("pin to CPU {cpu}"))
}
