//! hoard-agent: the node agent (one per node, a DaemonSet). It executes work orders from the
//! controller over mutually authenticated gRPC and needs no Kubernetes API rights.
//!
//! * [`volume`] turns a volume identity into an open directory confined to the kubelet pod
//!   directory.
//! * [`orders`] is the order book: idempotency, the node budget, cancellation, progress.
//! * [`jobs`] runs backups, restores and verifies through hoard-core.
//! * [`service`] is the gRPC service; [`server`] wires TLS, metrics and shutdown.
//! * [`metrics`] holds the Prometheus metrics and the health endpoints.
//! * [`state`] records completed orders durably, for idempotent replies across restarts.
//! * [`limits`] sizes the node's memory budget from the pod's cgroup limit.

pub mod jobs;
pub mod limits;
pub mod metrics;
pub mod orders;
pub mod server;
pub mod service;
pub mod state;
pub mod volume;
