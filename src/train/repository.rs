//! The model repository as the trainer uses it ([`crate::score::store`]: a local folder or an
//! object store): the stable version of its rollout, as every scoring instance's reloader
//! sees it, candidates kept with their decisions in `candidates/<round>/`, and publication of
//! a passed candidate as the next version.
//!
//! Candidates are trained and kept in the trainer's local folder for the repository (the
//! repository itself, or its cache for an object store, where each decision is also written
//! to `candidates/<round>/decision.json`). Publication makes the version visible only when
//! complete: a folder assembled under a hidden name and renamed into place, or on an object
//! store `decision.json` and then `model.pt` (a version exists once its `model.pt` does). A
//! version that exists already is never replaced.

use std::{fs, path::PathBuf};

use crate::{
    config::RepositoryLocation,
    score::{rollout, store::Repository},
};

use super::gate::Decision;

/// Opens the trainer's repository.
pub fn open(location: &RepositoryLocation) -> Result<Repository, String> {
    Repository::open(location)
}

/// The stable version: its number and its file (downloaded, for an object store).
pub fn serving(repository: &Repository) -> Result<(String, PathBuf), String> {
    let version = rollout::current(repository)?.stable;
    let path = repository.fetch(&rollout::model_file(&version))?;
    Ok((version, path))
}

/// The local file of `version` (downloaded, for an object store).
pub fn version_file(repository: &Repository, version: &str) -> Result<PathBuf, String> {
    repository.fetch(&rollout::model_file(version))
}

/// Where a round's candidate and decision go.
pub fn candidate_dir(repository: &Repository, round: &str) -> PathBuf {
    repository.work_dir().join("candidates").join(round)
}

fn decision_json(decision: &Decision) -> Vec<u8> {
    serde_json::to_vec_pretty(decision).expect("serializable")
}

/// Writes the round's `decision.json` beside its candidate (and into the object store).
pub fn write_decision(
    repository: &Repository,
    round: &str,
    decision: &Decision,
) -> Result<(), String> {
    let rel = format!("candidates/{round}/decision.json");
    let json = decision_json(decision);
    Repository::Local(repository.work_dir().to_owned()).write(&rel, &json)?;
    if let Repository::Store { .. } = repository {
        repository.write(&rel, &json)?;
    }
    Ok(())
}

/// Publishes the candidate file `model` as the next version (one above the highest in the
/// repository); returns its number.
pub fn publish(
    repository: &Repository,
    model: &std::path::Path,
    decision: &mut Decision,
) -> Result<String, String> {
    // Above every version there is, rolled back or not yet promoted ones included.
    let next = repository.versions()?.last().copied().unwrap_or(0) + 1;
    let version = next.to_string();
    decision.published_as = Some(version.clone());
    let bytes = fs::read(model).map_err(|e| format!("reading {}: {e}", model.display()))?;
    let json = decision_json(decision);
    repository.publish(&version, &[("decision.json", &json), ("model.pt", &bytes)])?;
    Ok(version)
}

/// Removes the oldest local candidates beyond `keep` (an object store's decisions stay).
pub fn prune_candidates(repository: &Repository, keep: usize) {
    let Ok(entries) = fs::read_dir(repository.work_dir().join("candidates")) else {
        return;
    };
    let mut rounds: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    rounds.sort();
    let excess = rounds.len().saturating_sub(keep);
    for old in &rounds[..excess] {
        let _ = fs::remove_dir_all(old);
    }
}
