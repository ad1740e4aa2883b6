//! Binary-classification metrics of a model version on labelled examples (predicted
//! probability of the positive class, label 0 or 1): what promotion gates compare between a
//! candidate and the serving version.
//!
//! - **log loss**: mean of −(y·ln p + (1−y)·ln(1−p)), with p clipped to [1e-7, 1 − 1e-7] so one
//!   confident mistake costs a lot but stays finite;
//! - **AUC**: the probability that a random positive scores above a random negative, ties
//!   counting one half (the Mann–Whitney statistic, from average ranks); `None` without both
//!   classes;
//! - **calibration error**: expected calibration error over ten equal-width bins of p, the
//!   example-weighted mean of |mean p − share of positives| per bin.

/// Clipping of probabilities in the log loss.
const EPSILON: f64 = 1e-7;
/// Bins of the calibration error.
const BINS: usize = 10;

/// The metrics of one version on one set of examples.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Metrics {
    pub examples: usize,
    pub positives: usize,
    pub log_loss: f64,
    pub auc: Option<f64>,
    pub calibration_error: f64,
    /// Every prediction was a finite number in [0, 1].
    pub finite: bool,
}

impl Metrics {
    /// `log loss 0.3253, AUC 0.7772, calibration error 0.0075`, or `-` for none.
    pub fn summary(m: Option<&Self>) -> String {
        m.map_or_else(
            || "-".to_owned(),
            |m| {
                format!(
                    "log loss {:.4}, AUC {}, calibration error {:.4}",
                    m.log_loss,
                    m.auc.map_or("-".into(), |a| format!("{a:.4}")),
                    m.calibration_error
                )
            },
        )
    }
}

/// The metrics of `predictions` (probabilities) against `labels`; `None` for no examples.
///
/// # Panics
/// If the two slices differ in length.
pub fn evaluate(predictions: &[f64], labels: &[bool]) -> Option<Metrics> {
    assert_eq!(predictions.len(), labels.len(), "one label per prediction");
    if predictions.is_empty() {
        return None;
    }
    let finite = predictions
        .iter()
        .all(|p| p.is_finite() && (0.0..=1.0).contains(p));
    let n = predictions.len() as f64;
    let log_loss = predictions
        .iter()
        .zip(labels)
        .map(|(p, y)| {
            let p = if p.is_nan() {
                0.5
            } else {
                p.clamp(EPSILON, 1.0 - EPSILON)
            };
            -if *y { p.ln() } else { (1.0 - p).ln() }
        })
        .sum::<f64>()
        / n;
    Some(Metrics {
        examples: predictions.len(),
        positives: labels.iter().filter(|y| **y).count(),
        log_loss,
        auc: auc(predictions, labels),
        calibration_error: calibration_error(predictions, labels),
        finite,
    })
}

/// Mann–Whitney AUC with average ranks for ties; `None` without both classes or with a NaN.
fn auc(predictions: &[f64], labels: &[bool]) -> Option<f64> {
    let positives = labels.iter().filter(|y| **y).count();
    let negatives = labels.len() - positives;
    if positives == 0 || negatives == 0 || predictions.iter().any(|p| p.is_nan()) {
        return None;
    }
    let mut order: Vec<usize> = (0..predictions.len()).collect();
    order.sort_by(|a, b| predictions[*a].total_cmp(&predictions[*b]));
    // Sum of the positives' ranks (1-based), ties sharing their average rank.
    let mut rank_sum = 0.0;
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && predictions[order[j + 1]] == predictions[order[i]] {
            j += 1;
        }
        let average = (i + j) as f64 / 2.0 + 1.0;
        rank_sum += average * order[i..=j].iter().filter(|k| labels[**k]).count() as f64;
        i = j + 1;
    }
    let (p, q) = (positives as f64, negatives as f64);
    Some((rank_sum - p * (p + 1.0) / 2.0) / (p * q))
}

/// Expected calibration error over [`BINS`] equal-width bins.
fn calibration_error(predictions: &[f64], labels: &[bool]) -> f64 {
    let mut bins = [(0usize, 0.0f64, 0usize); BINS];
    for (p, y) in predictions.iter().zip(labels) {
        let p = if p.is_finite() {
            p.clamp(0.0, 1.0)
        } else {
            0.5
        };
        let bin = ((p * BINS as f64) as usize).min(BINS - 1);
        bins[bin].0 += 1;
        bins[bin].1 += p;
        bins[bin].2 += usize::from(*y);
    }
    let n = predictions.len() as f64;
    bins.iter()
        .filter(|(count, _, _)| *count > 0)
        .map(|(count, sum, positives)| {
            let c = *count as f64;
            c / n * (sum / c - *positives as f64 / c).abs()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    /// Pairs counted by hand: positives {0.9, 0.4}, negatives {0.4, 0.1}. Of the four
    /// (positive, negative) pairs, three are ordered right and one is a tie: (3 + 0.5) / 4.
    #[test]
    fn auc_counts_ties_as_one_half() {
        let m = evaluate(&[0.9, 0.4, 0.4, 0.1], &[true, true, false, false]).unwrap();
        assert!(close(m.auc.unwrap(), 3.5 / 4.0), "{m:?}");
        assert_eq!((m.examples, m.positives), (4, 2));
    }

    #[test]
    fn auc_is_one_for_a_perfect_ranking_and_zero_for_the_reverse() {
        let labels = [false, false, true, true];
        let right = evaluate(&[0.1, 0.2, 0.8, 0.9], &labels).unwrap();
        let wrong = evaluate(&[0.9, 0.8, 0.2, 0.1], &labels).unwrap();
        assert_eq!((right.auc, wrong.auc), (Some(1.0), Some(0.0)));
    }

    /// Against the definition, pair by pair, on pseudo-random scores with many ties.
    #[test]
    fn auc_equals_the_share_of_ordered_pairs() {
        let mut state = 42u64;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as f64 / (1u64 << 31) as f64
        };
        let scores: Vec<f64> = (0..300).map(|_| (next() * 10.0).floor() / 10.0).collect();
        let labels: Vec<bool> = scores.iter().map(|s| next() < *s).collect();
        let mut pairs = 0.0;
        let mut right = 0.0;
        for (p, _) in scores.iter().zip(&labels).filter(|(_, y)| **y) {
            for (q, _) in scores.iter().zip(&labels).filter(|(_, y)| !**y) {
                pairs += 1.0;
                right += if p > q {
                    1.0
                } else if p == q {
                    0.5
                } else {
                    0.0
                };
            }
        }
        let auc = evaluate(&scores, &labels).unwrap().auc.unwrap();
        assert!(
            (auc - right / pairs).abs() < 1e-9,
            "{auc} vs {}",
            right / pairs
        );
    }

    #[test]
    fn auc_needs_both_classes() {
        assert_eq!(evaluate(&[0.3, 0.7], &[true, true]).unwrap().auc, None);
    }

    /// −(ln 0.8 + ln 0.6) / 2 for p = 0.8 (y = 1) and p = 0.4 (y = 0).
    #[test]
    fn log_loss_by_hand_and_clipped() {
        let m = evaluate(&[0.8, 0.4], &[true, false]).unwrap();
        assert!(
            close(m.log_loss, -(0.8f64.ln() + 0.6f64.ln()) / 2.0),
            "{m:?}"
        );
        let sure_and_wrong = evaluate(&[0.0], &[true]).unwrap();
        assert!(close(sure_and_wrong.log_loss, -(EPSILON.ln())));
        assert!(sure_and_wrong.log_loss.is_finite());
    }

    /// Bin 0.0-0.1: p 0.05 twice, one positive → |0.05 − 0.5| = 0.45, weight 2/4; bin 0.9-1.0:
    /// p 0.95 twice, both positive → |0.95 − 1| = 0.05, weight 2/4. ECE = 0.25.
    #[test]
    fn calibration_error_by_hand() {
        let m = evaluate(&[0.05, 0.05, 0.95, 0.95], &[true, false, true, true]).unwrap();
        assert!(close(m.calibration_error, 0.25), "{m:?}");
    }

    #[test]
    fn outputs_that_are_not_probabilities_are_flagged() {
        assert!(!evaluate(&[f64::NAN, 0.5], &[true, false]).unwrap().finite);
        assert!(!evaluate(&[1.5, 0.5], &[true, false]).unwrap().finite);
        assert!(evaluate(&[1.0, 0.0], &[true, false]).unwrap().finite);
        assert_eq!(evaluate(&[], &[]), None);
    }
}
