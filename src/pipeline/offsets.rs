//! Per-partition offset tracking: the contiguous durability watermark.
//!
//! The committed offset of a partition is the smallest offset that is not yet durable:
//! min(first offset of the open Parquet segment, oldest hold (an unacknowledged dead letter,
//! or the first offset of a batch whose predictions are not acknowledged), one past the last
//! processed offset). Every offset below it is in a finished file, acknowledged by the
//! dead-letter topic, or deliberately skipped. A later acknowledgement never moves the
//! watermark past an earlier offset that is still pending.

use std::collections::{BTreeMap, HashMap};

use crate::event::{Span, TopicPartition};

#[derive(Debug, Default)]
struct Partition {
    /// One past the highest offset processed.
    next: Option<i64>,
    /// Last offset committed (or known committed).
    committed: Option<i64>,
    /// Holds: offset → count (dead letters and predictions not yet acknowledged).
    pending: BTreeMap<i64, u32>,
}

/// The owned partitions' progress.
#[derive(Debug, Default)]
pub struct Offsets {
    partitions: HashMap<TopicPartition, Partition>,
}

impl Offsets {
    /// Starts tracking a newly assigned partition.
    pub fn assign(&mut self, tp: TopicPartition) {
        self.partitions.insert(tp, Partition::default());
    }

    /// Where a newly assigned partition starts, given its committed offset: a start past the
    /// commit (the sinks' files end there: a crash or a lost assignment after finishing, before
    /// committing) is itself committable, every offset below it being durable already; else
    /// a partition with nothing more to consume would never commit up to its end.
    pub fn resume(&mut self, tp: &TopicPartition, committed: Option<i64>, start: Option<i64>) {
        if let Some(p) = self.partitions.get_mut(tp) {
            p.committed = committed;
            if let Some(start) = start.filter(|s| committed.is_none_or(|c| *s > c)) {
                p.next = Some(start);
            }
        }
    }

    /// Stops tracking a revoked partition.
    pub fn revoke(&mut self, tp: &TopicPartition) {
        self.partitions.remove(tp);
    }

    pub fn owns(&self, tp: &TopicPartition) -> bool {
        self.partitions.contains_key(tp)
    }

    pub fn owned(&self) -> Vec<TopicPartition> {
        self.partitions.keys().cloned().collect()
    }

    /// Every offset of `span` has been handed to a sink or the dead-letter topic. Returns how
    /// many offsets before it were never seen (the span does not follow the last one): an
    /// offset reset after retention overtook the consumer, compaction, or transaction markers.
    pub fn processed(&mut self, tp: &TopicPartition, span: Span) -> i64 {
        let Some(p) = self.partitions.get_mut(tp) else {
            return 0;
        };
        let skipped = p.next.map_or(0, |n| (span.first - n).max(0));
        p.next = Some(p.next.map_or(span.next, |n| n.max(span.next)));
        skipped
    }

    /// Nothing at or after `offset` may be committed until [`Offsets::release`].
    pub fn hold(&mut self, tp: &TopicPartition, offset: i64) {
        if let Some(p) = self.partitions.get_mut(tp) {
            *p.pending.entry(offset).or_default() += 1;
        }
    }

    pub fn release(&mut self, tp: &TopicPartition, offset: i64) {
        if let Some(p) = self.partitions.get_mut(tp) {
            if let Some(n) = p.pending.get_mut(&offset) {
                *n -= 1;
                if *n == 0 {
                    p.pending.remove(&offset);
                }
            }
        }
    }

    /// The offset that may be committed for `tp` given where its open segment starts, if it
    /// is ahead of what was committed.
    pub fn committable(&self, tp: &TopicPartition, open_first: Option<i64>) -> Option<i64> {
        let p = self.partitions.get(tp)?;
        let watermark = [p.next, open_first, p.pending.keys().next().copied()]
            .into_iter()
            .flatten()
            .min()?;
        (p.committed.is_none_or(|c| watermark > c)).then_some(watermark)
    }

    pub fn mark_committed(&mut self, tp: &TopicPartition, offset: i64) {
        if let Some(p) = self.partitions.get_mut(tp) {
            p.committed = Some(p.committed.map_or(offset, |c| c.max(offset)));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn tp() -> TopicPartition {
        (Arc::from("t"), 0)
    }

    #[test]
    fn watermark_is_contiguous() {
        let mut o = Offsets::default();
        o.assign(tp());
        assert_eq!(o.committable(&tp(), None), None, "nothing processed yet");
        o.processed(&tp(), Span { first: 0, next: 10 });
        o.hold(&tp(), 3);
        o.hold(&tp(), 7);
        // Rows 0..10 are in an open segment starting at 0.
        assert_eq!(o.committable(&tp(), Some(0)), Some(0));
        // The segment is finished; dead letter 3 is still pending.
        assert_eq!(o.committable(&tp(), None), Some(3));
        // A later acknowledgement does not jump over the pending earlier one.
        o.release(&tp(), 7);
        assert_eq!(o.committable(&tp(), None), Some(3));
        o.release(&tp(), 3);
        assert_eq!(o.committable(&tp(), None), Some(10));
        o.mark_committed(&tp(), 10);
        assert_eq!(o.committable(&tp(), None), None, "already committed");
        o.processed(
            &tp(),
            Span {
                first: 10,
                next: 20,
            },
        );
        assert_eq!(o.committable(&tp(), Some(12)), Some(12));
    }

    /// Review finding A14: offsets the consumer never saw are counted, not silently
    /// committed over.
    #[test]
    fn offsets_never_seen_are_counted() {
        let mut o = Offsets::default();
        o.assign(tp());
        assert_eq!(o.processed(&tp(), Span { first: 4, next: 10 }), 0);
        assert_eq!(
            o.processed(
                &tp(),
                Span {
                    first: 10,
                    next: 12
                }
            ),
            0
        );
        assert_eq!(
            o.processed(
                &tp(),
                Span {
                    first: 20,
                    next: 25
                }
            ),
            8
        );
        assert_eq!(
            o.processed(
                &tp(),
                Span {
                    first: 22,
                    next: 24
                }
            ),
            0,
            "a replay"
        );
        assert_eq!(o.committable(&tp(), None), Some(25));
    }

    /// Scenario 6 in CI: files finished past the committed offset, then the assignment was
    /// lost; the next owner resumed after the files, found nothing more to consume, and never
    /// committed the partition's end.
    #[test]
    fn a_resume_position_past_the_commit_is_committed() {
        let mut o = Offsets::default();
        o.assign(tp());
        o.resume(&tp(), Some(7_000), Some(7_500));
        assert_eq!(o.committable(&tp(), None), Some(7_500));
        o.assign(tp());
        o.resume(&tp(), Some(7_500), Some(7_500));
        assert_eq!(o.committable(&tp(), None), None, "already committed");
        o.assign(tp());
        o.resume(&tp(), Some(7_500), None);
        assert_eq!(o.committable(&tp(), None), None);
    }

    #[test]
    fn revoked_partitions_are_forgotten() {
        let mut o = Offsets::default();
        o.assign(tp());
        o.processed(&tp(), Span { first: 0, next: 5 });
        o.revoke(&tp());
        assert!(!o.owns(&tp()));
        assert_eq!(o.committable(&tp(), None), None);
        o.processed(&tp(), Span { first: 5, next: 6 });
        assert_eq!(
            o.committable(&tp(), None),
            None,
            "late spans of revoked partitions are ignored"
        );
    }
}
