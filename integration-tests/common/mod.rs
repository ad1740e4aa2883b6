//! Test harness: a real Kafka-protocol broker process (tansu, or any broker named by
//! `KAFKA_BOOTSTRAP`), a real `redis-server`, the real `sluice` binary, and an independent
//! oracle that reads the Parquet files, the dead-letter topic and the committed offsets back.
//!
//! - [`broker`]: the broker process, its admin and readers, producing events;
//! - [`events`]: the test events (valid, and broken in every way sluice must name);
//! - [`pipeline`]: a pipeline file for one test and the `sluice` process running it;
//! - [`members`]: several instances of one pipeline in a group, restarted as a supervisor would;
//! - [`models`]: TorchScript files from PyTorch, model repositories, a scoring pipeline;
//! - [`process`]: ports, names, signals, helper programs, HTTP;
//! - [`oracle`]: the delivery promise's properties, each a function that returns its violation;
//! - [`redis_server`]: a `redis-server` for one test;
//! - [`s3`]: a local S3-compatible server (moto) for one test.
#![allow(dead_code)]

pub mod broker;
pub mod events;
pub mod members;
pub mod models;
pub mod oracle;
pub mod pipeline;
pub mod process;
pub mod redis_server;
pub mod s3;

// Not every test uses every part.
#[allow(unused_imports)]
pub use self::{
    broker::*, events::*, members::*, models::*, oracle::*, pipeline::*, process::*,
    redis_server::*, s3::*,
};
