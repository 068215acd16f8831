//! Where jobs live. Two stores, one interface each for the two sides that
//! use them: the API (`jobs`: submit, poll, delete) and the engine (`work`:
//! find, claim, show, let go). Each operation either finishes at once
//! (shared data, `shared`) or asks for a call to etcd first (`etcd`) and
//! resumes with its answer; neither side knows which store runs.

pub mod etcd;
pub(crate) mod jobs;
pub mod shared;
pub mod work;

pub use shared::{Keys, Store};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// `max_jobs` jobs are held already (with the key's counters, when read).
    Full(Option<Box<crate::governance::KeyState>>),
    /// A host failure, or contention that bounded retries did not overcome.
    Busy(String),
    /// The job does not fit one value of the store.
    TooLarge,
    /// The key's limits refuse it; its counters as they stand.
    Refused(crate::governance::Refusal, Box<crate::governance::KeyState>),
}
