//! A training example: a scored event's features exactly as fed, what the model answered,
//! and the label that arrived for it (or the default one), as the label join produces it and
//! the trainer reads it (one JSON record per example, keyed by event id).

/// One example.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct Example {
    pub event_id: String,
    pub model: String,
    /// The version that scored the event.
    pub model_version: String,
    pub features: Vec<f64>,
    pub outputs: Vec<f64>,
    pub label: f64,
    /// False for an example with the default label (no label arrived in the window).
    pub labelled: bool,
    /// When the event was scored (the feedback record's timestamp), ms since the epoch.
    pub scored_at: i64,
    pub labelled_at: Option<String>,
}
