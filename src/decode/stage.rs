//! The decode stage: one thread per pipeline between the source and the pipeline task.
//!
//! It receives the source's events in order, decodes each micro-batch into Arrow (the most
//! CPU-heavy step of a pipeline) and passes everything on in the same order, so rebalances
//! still arrive after the batches that preceded them. While it decodes batch n+1, the
//! pipeline task writes batch n to the sinks: on two cores that overlap is what lets decoding
//! and writing each have a core. Both channels are bounded, so backpressure from the sinks
//! reaches the source unchanged.

use std::{thread::JoinHandle, time::Instant};

use tokio::sync::mpsc;

use super::Decoder;
use crate::{
    source::{SourceBatch, SourceEvent},
    telemetry,
};

/// Starts the stage's thread. It stops when either side goes away: the source stopping
/// (the pipeline then sees its channel close) or the pipeline dropping its receiver.
pub fn spawn(
    pipeline: &str,
    mut decoder: Decoder,
    keep_originals: bool,
    mut input: mpsc::Receiver<SourceEvent>,
    capacity: usize,
) -> (mpsc::Receiver<SourceEvent<SourceBatch>>, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let labels = pipeline.to_owned();
    let thread = std::thread::Builder::new()
        .name(format!("decode-{pipeline}"))
        .spawn(move || {
            while let Some(event) = input.blocking_recv() {
                let out = match event {
                    SourceEvent::Batch(raw) => {
                        let started = Instant::now();
                        let batch = raw.decode(&mut decoder, keep_originals);
                        telemetry::stage(&labels, "decode", started);
                        SourceEvent::Batch(batch)
                    }
                    SourceEvent::Assigned { partitions, reply } => {
                        SourceEvent::Assigned { partitions, reply }
                    }
                    SourceEvent::Revoked { partitions, reply } => {
                        SourceEvent::Revoked { partitions, reply }
                    }
                };
                if tx.blocking_send(out).is_err() {
                    return;
                }
            }
        })
        .expect("spawning the decode thread");
    (rx, thread)
}
