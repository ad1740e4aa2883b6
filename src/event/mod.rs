//! The events that flow between the stages, and nothing else: types only, no behaviour that
//! needs another module. Every stage (source, decode, score, sinks, the runner) speaks these
//! types, so none imports another's internals.
//!
//! - [`TopicPartition`], [`Span`]: where events are and which offsets a batch covers.
//! - [`RawBatch`] (as consumed) and [`SourceBatch`] (decoded: Arrow rows, rejected events and
//!   spans), carried in [`SourceEvent`]s together with rebalances, in the order they happened.
//! - [`Originals`]: the valid events' original bytes, for stages after decode that may still
//!   reject one.
//! - [`Rejected`] and its [`Failure`] (stage and stable reason code: [`DecodeError`],
//!   [`InferenceError`], Redis): everything a dead letter carries.
//! - [`Example`]: a training example, from the label join to the trainer.

mod batch;
mod example;
mod rejection;

use std::sync::Arc;

pub use self::{
    batch::{Backlog, Originals, RawBatch, RawHeader, RawMessage, SourceBatch, SourceEvent},
    example::Example,
    rejection::{DecodeError, Failure, InferenceError, Rejected},
};

/// A topic and partition; topic names are shared, not copied per message.
pub type TopicPartition = (Arc<str>, i32);

/// The offsets a batch covers in one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub first: i64,
    /// One past the last offset.
    pub next: i64,
}
