//! The learning loop's last part: the trainer (`sluice train`), which turns the label join's
//! examples ([`crate::sink::join`]) into new model versions, published only when they pass
//! the promotion gates on a holdout.
//!
//! - [`trainer`]: the process: the examples consumer (one trainer per model: a one-partition
//!   topic in a group), rounds, commits;
//! - [`round`]: fine-tuning a TorchScript version with libtorch, and a version's predictions;
//! - [`metrics`]: log loss, AUC, calibration error of a version on labelled examples;
//! - [`gate`]: the gates and the [`gate::Decision`] kept for every round;
//! - [`repository`]: the serving version, candidates, and publication (write, then rename);
//! - [`watch`]: online metrics per version, and the watch that promotes or rolls back a
//!   published version through the repository's rollout ([`crate::score::rollout`]).

pub mod gate;
pub mod metrics;
pub mod repository;
pub mod round;
pub mod trainer;
pub mod watch;
