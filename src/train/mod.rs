//! The learning loop (issue 12), being built: labels joined to feedback records, incremental
//! training, and promotion gated on a holdout. So far: [`metrics`], how a candidate version
//! and the serving one are compared on labelled examples.

pub mod metrics;
