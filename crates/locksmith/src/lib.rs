//! locksmith: a cluster-wide reboot semaphore. At most `max` machines hold the reboot
//! lock at once; the semaphore is one JSON value in meshd (or any etcd v3 server) in
//! CoreOS locksmith's layout, changed only by compare-and-swap transactions.
//!
//! # Layout
//! - [`semaphore`]: the value (key, JSON format, validation) and lock / unlock /
//!   set-max as pure functions.
//! - [`cas`]: the read-modify-write loop over [`mesh_core::client::Client`]; the error
//!   type and its exit codes.
//! - [`wait`]: waiting for a free slot (watch + exponential backoff, spinner).
//! - [`window`]: reboot windows ("Thu 23:00" + 1h30m) in local time.
//! - [`process`]: `run` and `reboot`: commands run while holding a slot, signals.
//! - [`daemon`]: the systemd daemon (release at start, need-reboot, window, reboot),
//!   on the cluster or through a FleetLock server.
//! - [`fleetlock`]: Zincati's FleetLock protocol: a server over the semaphore and the
//!   daemon's client.
//! - [`cli`] the clap definitions; [`commands`] settings and the short commands.
// Doc comments of the clap definitions are the help text, where `<name>` is a
// placeholder, not HTML.
#![allow(rustdoc::invalid_html_tags)]
pub mod cas;
pub mod cli;
pub mod commands;
pub mod daemon;
pub mod fleetlock;
pub mod process;
pub mod semaphore;
pub mod wait;
pub mod window;
