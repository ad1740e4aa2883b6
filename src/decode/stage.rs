//! The decode stage: one thread per pipeline between the source and the pipeline task.
//!
//! It receives the source's events in order, decodes each micro-batch into Arrow (the most
//! CPU-heavy step of a pipeline) and passes everything on in the same order, so rebalances
//! still arrive after the batches that preceded them. While it decodes batch n+1, the
//! pipeline task writes batch n to the sinks: on two cores that overlap is what lets decoding
//! and writing each have a core. Both channels are bounded, so backpressure from the sinks
//! reaches the source unchanged.

use std::{sync::Arc, thread::JoinHandle, time::Instant};

use tokio::sync::mpsc;

use super::{Decoder, Origin};
use crate::{
    event::{DecodeError, Failure, Originals, RawBatch, Rejected, SourceBatch, SourceEvent},
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
                        let batch = decode(raw, &mut decoder, keep_originals);
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

/// Decodes and validates every event: valid ones become rows, the others [`Rejected`]
/// with their original key, bytes and headers. With `keep_originals`, the valid events'
/// bytes stay available too (for later stages that may still reject them). CPU-heavy.
pub fn decode(raw: RawBatch, decoder: &mut Decoder, keep_originals: bool) -> SourceBatch {
    let mut rejected = Vec::new();
    let mut kept = Vec::new();
    for m in raw.messages {
        let payload = m.payload.clone().map(|r| &raw.bytes[r]);
        let origin = Origin {
            topic: &m.topic,
            partition: m.partition,
            offset: m.offset,
            timestamp: m.timestamp,
        };
        let decoded = match &m.bad_header {
            Some(name) => Err(DecodeError::BadHeader { name: name.clone() }),
            None => decoder.push(origin, payload),
        };
        if let Err(error) = decoded {
            rejected.push(Rejected {
                key: m.key.map(|r| raw.bytes[r].to_vec()),
                payload: payload.map(<[u8]>::to_vec),
                topic: m.topic,
                partition: m.partition,
                offset: m.offset,
                timestamp: m.timestamp,
                headers: m.headers,
                error: Failure::Decode(error),
            });
        } else if keep_originals {
            kept.push(m);
        }
    }
    let originals = keep_originals.then(|| Arc::new(Originals::new(kept, raw.bytes)));
    SourceBatch {
        rows: decoder.finish(),
        rejected,
        spans: raw.spans,
        payload_bytes: raw.payload_bytes,
        originals,
        consumed_at: raw.consumed_at.unwrap_or_else(Instant::now),
        ticket: raw.ticket,
    }
}
