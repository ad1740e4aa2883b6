//! Promotion gates: a candidate is published only if, on the round's holdout, it is not worse
//! than the serving version by more than the configured margins, the holdout is large enough
//! and every prediction is finite. Every decision, passed or refused, is kept as a
//! [`Decision`] (JSON beside the candidate, and beside the version when it is published).

use crate::config::GateSpec;

use super::{metrics::Metrics, round::Trained};

/// Why a candidate was or was not published, with everything the decision looked at.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Decision {
    pub model: String,
    /// The round's id: when it started, `YYYYMMDDTHHMMSSZ`.
    pub round: String,
    pub serving_version: String,
    /// The version the candidate was published as, when it passed.
    pub published_as: Option<String>,
    pub passed: bool,
    /// Every gate it failed (empty when it passed).
    pub reasons: Vec<String>,
    pub gates: Gates,
    pub trained: Option<Trained>,
    pub examples: usize,
    pub holdout_examples: usize,
    /// Scored-at times (ms since the epoch) of the first and last holdout example.
    pub holdout_from: Option<i64>,
    pub holdout_to: Option<i64>,
    pub serving: Option<Metrics>,
    pub candidate: Option<Metrics>,
    pub decided_at: String,
}

/// The gates as configured, recorded with each decision.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Gates {
    pub min_examples: usize,
    pub max_log_loss_increase: f64,
    pub max_auc_decrease: f64,
}

impl From<GateSpec> for Gates {
    fn from(g: GateSpec) -> Self {
        Self {
            min_examples: g.min_examples,
            max_log_loss_increase: g.max_log_loss_increase,
            max_auc_decrease: g.max_auc_decrease,
        }
    }
}

/// The gates `candidate` fails against `serving` on one holdout; none when it passes.
pub fn failures(gates: &GateSpec, serving: &Metrics, candidate: &Metrics) -> Vec<String> {
    let mut out = Vec::new();
    if candidate.examples < gates.min_examples {
        out.push(format!(
            "the holdout has {} examples, fewer than train.min_examples = {}",
            candidate.examples, gates.min_examples
        ));
    }
    if !candidate.finite {
        out.push("the candidate returned values that are not finite probabilities".into());
    }
    // NaN compares as neither: a candidate whose loss is not a number fails.
    let within = candidate
        .log_loss
        .partial_cmp(&(serving.log_loss + gates.max_log_loss_increase));
    if !matches!(
        within,
        Some(std::cmp::Ordering::Less | std::cmp::Ordering::Equal)
    ) {
        out.push(format!(
            "holdout log loss {:.5} is worse than the serving version's {:.5} by more than \
             train.max_log_loss_increase = {}",
            candidate.log_loss, serving.log_loss, gates.max_log_loss_increase
        ));
    }
    match (candidate.auc, serving.auc) {
        (Some(c), Some(s)) if c < s - gates.max_auc_decrease => out.push(format!(
            "holdout AUC {c:.5} is lower than the serving version's {s:.5} by more than \
             train.max_auc_decrease = {}",
            gates.max_auc_decrease
        )),
        (Some(_), Some(_)) => {}
        _ => out.push("the holdout has one class only: AUC is undefined".into()),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(log_loss: f64, auc: Option<f64>) -> Metrics {
        Metrics {
            examples: 500,
            positives: 100,
            log_loss,
            auc,
            calibration_error: 0.01,
            finite: true,
        }
    }

    #[test]
    fn a_candidate_passes_only_within_every_margin() {
        let gates = GateSpec {
            min_examples: 200,
            max_log_loss_increase: 0.01,
            max_auc_decrease: 0.02,
        };
        let serving = m(0.30, Some(0.80));
        assert!(failures(&gates, &serving, &m(0.305, Some(0.79))).is_empty());
        assert!(failures(&gates, &serving, &m(0.20, Some(0.90))).is_empty());
        let worse = failures(&gates, &serving, &m(0.32, Some(0.77)));
        assert_eq!(worse.len(), 2, "{worse:?}");
        assert!(worse[0].contains("log loss 0.32000") && worse[1].contains("AUC 0.77000"));
        let few = Metrics {
            examples: 10,
            ..m(0.1, Some(0.9))
        };
        assert!(failures(&gates, &serving, &few)[0].contains("10 examples"));
        let nan = Metrics {
            log_loss: f64::NAN,
            finite: false,
            ..m(0.1, Some(0.9))
        };
        assert_eq!(
            failures(&gates, &serving, &nan).len(),
            2,
            "not finite, NaN loss"
        );
        assert!(failures(&gates, &m(0.3, None), &m(0.2, None))[0].contains("one class"));
    }
}
