//! The programs of the object the agent loads, one file per attach point. Each entry point is a
//! one-liner over the shared logic in the library; no entry point can panic, and errors become
//! documented verdicts inside the logic.
mod flow_write;
mod from_netdev;
mod from_pod;
mod sock;
mod to_netdev;
mod to_pod;
