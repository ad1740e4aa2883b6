//! The model repository as the trainer uses it: the serving version (the highest
//! `<n>/model.pt`, as every scoring instance's reloader sees it), candidates kept with their
//! decisions in `candidates/<round>/`, and publication of a passed candidate as `<n + 1>/`.
//!
//! Publication is write, then rename: the version's folder is assembled under a hidden name
//! (`model.pt` and `decision.json`, both synced) and renamed into place in one step, so a
//! reloader never sees a half-written version. If another trainer published the same number
//! meanwhile, the rename fails and nothing is replaced.

use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
};

use crate::{config::ModelSource, score::model};

use super::gate::Decision;

/// The version in service: its number and file.
pub fn serving(repository: &Path) -> Result<(String, PathBuf), String> {
    let c = model::newest(&ModelSource::Repository(repository.to_owned()), &[])?;
    Ok((c.version, c.path))
}

/// Where a round's candidate and decision go.
pub fn candidate_dir(repository: &Path, round: &str) -> PathBuf {
    repository.join("candidates").join(round)
}

fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = fs::File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Writes `decision.json` into `dir`.
pub fn write_decision(dir: &Path, decision: &Decision) -> std::io::Result<()> {
    let json = serde_json::to_vec_pretty(decision).expect("serializable");
    write_synced(&dir.join("decision.json"), &json)
}

/// Publishes the candidate file `model` as version `serving + 1`; returns its number.
pub fn publish(
    repository: &Path,
    serving: &str,
    model: &Path,
    decision: &mut Decision,
) -> Result<String, String> {
    let next = serving
        .parse::<u64>()
        .map_err(|_| format!("serving version {serving:?} is not a number"))?
        + 1;
    let version = next.to_string();
    decision.published_as = Some(version.clone());
    let staging = repository.join(format!(".publishing-{version}-{}", std::process::id()));
    let fail = |what: &str, e: std::io::Error| format!("{what} {}: {e}", staging.display());
    fs::create_dir_all(&staging).map_err(|e| fail("creating", e))?;
    let bytes = fs::read(model).map_err(|e| fail("reading the candidate for", e))?;
    write_synced(&staging.join("model.pt"), &bytes).map_err(|e| fail("writing", e))?;
    write_decision(&staging, decision).map_err(|e| fail("writing the decision in", e))?;
    let target = repository.join(&version);
    if target.exists() {
        let _ = fs::remove_dir_all(&staging);
        return Err(format!(
            "{} exists already: another trainer published version {version}",
            target.display()
        ));
    }
    fs::rename(&staging, &target).map_err(|e| {
        let _ = fs::remove_dir_all(&staging);
        format!("renaming into {}: {e}", target.display())
    })?;
    if let Ok(dir) = fs::File::open(repository) {
        let _ = dir.sync_all();
    }
    Ok(version)
}

/// Removes the oldest candidates beyond `keep`.
pub fn prune_candidates(repository: &Path, keep: usize) {
    let Ok(entries) = fs::read_dir(repository.join("candidates")) else {
        return;
    };
    let mut rounds: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    rounds.sort();
    let excess = rounds.len().saturating_sub(keep);
    for old in &rounds[..excess] {
        let _ = fs::remove_dir_all(old);
    }
}
