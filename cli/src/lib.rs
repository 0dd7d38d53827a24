//! The hoard command-line tools: `hoard` (local verbs on any repository) and `kubectl-hoard`
//! (the kubectl plugin: cluster verbs on the hoard.dev API objects).
//!
//! [`ops`] holds the repository verbs both binaries run (`check`, `unlock`, key listing), so
//! `kubectl hoard repo check` and `hoard check` are the same code path. [`kubectl`] is the plugin.

pub mod kubectl;
pub mod listing;
pub mod ops;
pub mod output;
