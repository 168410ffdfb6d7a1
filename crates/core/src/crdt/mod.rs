//! Small convergent types used as gossip data. They only depend on the `mesh` traits.
//!
//! # Layout
//! - `counter.rs`: [`GCounter`], [`PNCounter`], the named [`CounterSet`] and the
//!   ready-made [`CounterGossiper`] channel.
mod counter;

pub use counter::{CounterGossiper, CounterSet, GCounter, PNCounter};
