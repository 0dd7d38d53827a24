//! hoard-core: the repository format and the data path shared by the agent, controller and CLI.
//!
//! * [`repo`] opens and creates repositories ([`repo::Repository`]); [`store`] is the storage
//!   trait over `object_store` and its decorators.
//! * [`backup`] and [`restore`] are the pipelines; [`writer`] dedups, compresses, seals, packs
//!   and uploads blobs.
//! * [`chunker`], [`pack`], [`index`], [`tree`] and [`snapshot`] are sans-IO codecs and planners.
//! * [`crypto`] holds keys, key slots and authenticated encryption.
//!
//! Nothing here knows about Kubernetes.

pub mod backup;
pub mod blockwrite;
pub mod browse;
pub mod budget;
pub mod bufpool;
pub mod cache;
pub mod check;
pub mod chunker;
pub mod copy;
pub mod crypto;
pub mod directread;
pub mod error;
pub mod faults;
pub mod fsmeta;
pub mod id;
pub mod index;
pub mod lock;
pub mod mirror;
pub mod pack;
pub mod progress;
pub mod prune;
pub mod repair;
pub mod repo;
pub mod restore;
pub mod retention;
pub mod scan;
pub mod snapshot;
pub mod spool;
pub mod store;
pub mod tree;
pub mod uring;
pub mod util;
pub mod writer;

pub use error::{Error, Result};
pub use id::Id;
pub use repo::{Password, Repository};
