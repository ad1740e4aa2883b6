//! Rollout between the versions of a model repository: which version is stable, which one a
//! canary share of entities sees, which one is scored in the shadow, and which were rolled
//! back. It lives in the repository as `rollout.json`, so every scoring instance's reloader
//! follows it, and it is changed in one place for all of them: by `sluice model …` or by the
//! trainer ([`crate::train`]).
//!
//! Without the file the highest numbered version is stable (as a repository always behaved);
//! with it, the stable version is pinned, and a version published later serves only once it
//! is promoted. The file is replaced by write, then rename, so a reloader reads the old file
//! or the new one. Writers are the operator and the model's one trainer; when both write at
//! once, the last rename wins (each change is logged with its reason).

use serde::{Deserialize, Serialize};

use super::store::Repository;

/// The file's name in the repository.
pub const FILE: &str = "rollout.json";
/// Earlier stable versions kept for rollbacks.
const HISTORY: usize = 20;

/// A canary: `version` serves the entities whose key hashes into the first `weight` share.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Canary {
    pub version: String,
    pub weight: f64,
}

/// A version under watch by the trainer since `since` (ms since the epoch), compared on the
/// labels that arrive for events scored from then on with `baseline`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Watch {
    pub version: String,
    pub baseline: String,
    pub since: i64,
}

/// The rollout of a repository.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    pub stable: String,
    /// Earlier stable versions, the most recent last: what a rollback goes back to.
    #[serde(default)]
    pub previous: Vec<String>,
    #[serde(default)]
    pub canary: Option<Canary>,
    #[serde(default)]
    pub shadow: Option<String>,
    /// Versions rolled back: never served again unless promoted by name.
    #[serde(default)]
    pub refused: Vec<String>,
    #[serde(default)]
    pub watch: Option<Watch>,
    #[serde(default)]
    pub updated_at: String,
    /// Why it last changed, e.g. "promoted by the operator".
    #[serde(default)]
    pub reason: String,
}

/// The object of `version`'s model file in a repository.
pub fn model_file(version: &str) -> String {
    format!("{version}/model.pt")
}

/// The rollout file, if there is one.
pub fn read(repository: &Repository) -> Result<Option<Rollout>, String> {
    match repository.read(FILE)? {
        Some(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| format!("{repository}/{FILE}: {e}")),
        None => Ok(None),
    }
}

/// The rollout in force: the file, or the newest version as stable.
pub fn current(repository: &Repository) -> Result<Rollout, String> {
    if let Some(r) = read(repository)? {
        return Ok(r);
    }
    let newest = repository.versions()?.pop().ok_or_else(|| {
        format!("{repository} holds no version (expected <version>/model.pt, e.g. 1/model.pt)")
    })?;
    Ok(Rollout {
        stable: newest.to_string(),
        previous: Vec::new(),
        canary: None,
        shadow: None,
        refused: Vec::new(),
        watch: None,
        updated_at: String::new(),
        reason: "the newest version (no rollout file)".into(),
    })
}

/// Writes the rollout in force as the file if there is none yet, pinning the stable version:
/// a version published after it is not served until promoted.
pub fn pin(repository: &Repository) -> Result<Rollout, String> {
    match read(repository)? {
        Some(r) => Ok(r),
        None => write(
            repository,
            &current(repository)?,
            "pinned before a publication",
        ),
    }
}

/// Replaces the rollout file (write, then rename; a put on an object store).
pub fn write(repository: &Repository, rollout: &Rollout, reason: &str) -> Result<Rollout, String> {
    let mut rollout = rollout.clone();
    rollout.updated_at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    rollout.reason = reason.to_owned();
    let json = serde_json::to_vec_pretty(&rollout).expect("serializable");
    repository.write(FILE, &json)?;
    Ok(rollout)
}

/// A change of the rollout.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// `version` (or the canary, or the shadow, or the newest version above the stable one)
    /// becomes stable.
    Promote(Option<String>),
    /// The canary or the shadow is withdrawn, or with neither, the stable version goes back to
    /// the previous one; the version rolled back is refused.
    Rollback,
    Canary {
        version: String,
        weight: f64,
    },
    Shadow(String),
    /// The trainer starts (or ends, with `None`) watching a version.
    Watch(Option<Watch>),
    /// `version` failed (a circuit breaker tripped on it): withdrawn from whichever slot holds
    /// it (the stable version goes back to the previous one) and refused. Changes nothing more
    /// when it is already out of service, so every instance that trips may send it.
    Refuse(String),
}

/// Applies `change` to the repository's rollout and writes it; returns the new rollout.
pub fn change(repository: &Repository, change: Change, reason: &str) -> Result<Rollout, String> {
    let mut r = current(repository)?;
    let exists = |v: &str| -> Result<(), String> {
        match repository.stamp(&model_file(v)) {
            Ok(_) => Ok(()),
            Err(_) => Err(format!(
                "version {v:?} is not in {repository} (no {v}/model.pt)"
            )),
        }
    };
    match change {
        Change::Promote(version) => {
            let version = match version {
                Some(v) => v,
                None => match (&r.canary, &r.shadow) {
                    (Some(c), _) => c.version.clone(),
                    (None, Some(s)) => s.clone(),
                    (None, None) => {
                        let stable: u64 = r.stable.parse().unwrap_or(0);
                        repository
                            .versions()?
                            .into_iter()
                            .filter(|v| *v > stable && !r.refused.contains(&v.to_string()))
                            .max()
                            .ok_or("there is no canary, shadow or newer version to promote")?
                            .to_string()
                    }
                },
            };
            exists(&version)?;
            if version != r.stable {
                r.previous
                    .push(std::mem::replace(&mut r.stable, version.clone()));
                let excess = r.previous.len().saturating_sub(HISTORY);
                r.previous.drain(..excess);
            }
            r.refused.retain(|v| *v != version);
            r.canary = None;
            r.shadow = None;
            r.watch = None;
        }
        Change::Rollback => {
            let withdrawn = r
                .canary
                .take()
                .map(|c| c.version)
                .into_iter()
                .chain(r.shadow.take())
                .collect::<Vec<_>>();
            if withdrawn.is_empty() {
                let back = go_back(repository, &mut r)?;
                exists(&back)?;
                let bad = std::mem::replace(&mut r.stable, back);
                r.refused.push(bad);
            } else {
                r.refused.extend(withdrawn);
            }
            r.watch = None;
        }
        Change::Canary { version, weight } => {
            if !(weight > 0.0 && weight <= 1.0) {
                return Err(format!("a canary weight is in (0, 1]; got {weight}"));
            }
            exists(&version)?;
            r.refused.retain(|v| *v != version);
            r.canary = Some(Canary { version, weight });
        }
        Change::Shadow(version) => {
            exists(&version)?;
            r.refused.retain(|v| *v != version);
            r.shadow = Some(version);
        }
        Change::Watch(watch) => r.watch = watch,
        Change::Refuse(version) => {
            if r.canary.as_ref().is_some_and(|c| c.version == version) {
                r.canary = None;
            }
            if r.shadow.as_deref() == Some(version.as_str()) {
                r.shadow = None;
            }
            if r.stable == version {
                r.stable = go_back(repository, &mut r)?;
            }
            if r.watch.as_ref().is_some_and(|w| w.version == version) {
                r.watch = None;
            }
            r.refused.push(version);
        }
    }
    r.refused
        .sort_by_key(|v| v.parse::<u64>().unwrap_or(u64::MAX));
    r.refused.dedup();
    write(repository, &r, reason)
}

/// The version a rollback of the stable one goes to: the last stable version before it, or
/// else the highest version below it that was not refused.
fn go_back(repository: &Repository, r: &mut Rollout) -> Result<String, String> {
    let stable: u64 = r.stable.parse().unwrap_or(0);
    let below = repository
        .versions()?
        .into_iter()
        .filter(|v| *v < stable && !r.refused.contains(&v.to_string()))
        .max()
        .map(|v| v.to_string());
    r.previous
        .pop()
        .or(below)
        .ok_or_else(|| format!("version {} has no earlier version to go back to", r.stable))
}

/// Whether the entity `key` is in the first `weight` share of keys (a stable hash of it).
pub fn in_share(key: &[u8], weight: f64) -> bool {
    const BUCKETS: u32 = 10_000;
    let bucket = crate::util::hash::fnv1a(key) % BUCKETS;
    f64::from(bucket) < weight * f64::from(BUCKETS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo(versions: &[u32]) -> (tempfile::TempDir, Repository) {
        let dir = tempfile::tempdir().unwrap();
        for v in versions {
            let d = dir.path().join(v.to_string());
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("model.pt"), b"x").unwrap();
        }
        let repo = Repository::Local(dir.path().to_owned());
        (dir, repo)
    }

    #[test]
    fn without_a_file_the_newest_version_is_stable() {
        let (_dir, repo) = repo(&[1, 2, 10]);
        assert_eq!(read(&repo).unwrap(), None);
        assert_eq!(current(&repo).unwrap().stable, "10");
    }

    #[test]
    fn promote_canary_and_rollback_move_between_versions() {
        let (_dir, repo) = repo(&[1, 2, 3]);
        let at = &repo;
        let r = change(at, Change::Rollback, "test").unwrap();
        assert_eq!(r.stable, "2", "with no history, the highest version below");
        assert_eq!(r.refused, vec!["3".to_owned()]);
        let r = change(at, Change::Rollback, "test").unwrap();
        assert_eq!(r.stable, "1");
        assert!(
            change(at, Change::Rollback, "test").is_err(),
            "nothing below 1"
        );
        assert!(
            change(at, Change::Promote(None), "test").is_err(),
            "2 and 3 were refused: only a promotion by name brings them back"
        );
        let r = change(at, Change::Promote(Some("2".into())), "test").unwrap();
        assert_eq!(
            (r.stable.as_str(), r.refused.clone()),
            ("2", vec!["3".into()])
        );
        let canary = Change::Canary {
            version: "3".into(),
            weight: 0.25,
        };
        let r = change(at, canary, "test").unwrap();
        assert!(r.refused.is_empty());
        let r = change(at, Change::Promote(None), "test").unwrap();
        assert_eq!((r.stable.as_str(), r.canary.clone()), ("3", None));
        assert_eq!(r.previous, vec!["1".to_owned(), "2".to_owned()]);
        let r = change(at, Change::Shadow("1".into()), "test").unwrap();
        let r2 = change(at, Change::Rollback, "shadow failed").unwrap();
        assert_eq!(
            r2.stable, r.stable,
            "withdrawing the shadow leaves stable alone"
        );
        assert_eq!(r2.refused, vec!["1".to_owned()]);
        assert_eq!(r2.reason, "shadow failed");
        let r = change(at, Change::Rollback, "test").unwrap();
        assert_eq!(r.stable, "2", "back to the last stable version");
        assert!(change(at, Change::Promote(Some("7".into())), "test").is_err());
        let heavy = Change::Canary {
            version: "3".into(),
            weight: 1.5,
        };
        assert!(change(at, heavy, "test").is_err());
        assert_eq!(
            read(at).unwrap().unwrap(),
            r,
            "what was written is read back"
        );

        // A breaker's refusal withdraws the version from its slot only, and again is a no-op.
        let canary = Change::Canary {
            version: "3".into(),
            weight: 0.5,
        };
        change(at, canary, "test").unwrap();
        let r = change(at, Change::Refuse("3".into()), "breaker").unwrap();
        assert_eq!((r.stable.as_str(), r.canary.clone()), ("2", None));
        let again = change(at, Change::Refuse("3".into()), "breaker").unwrap();
        assert_eq!(
            (again.stable.as_str(), again.refused.clone()),
            ("2", r.refused.clone())
        );
        let r = change(at, Change::Refuse("2".into()), "breaker").unwrap();
        assert_eq!(r.stable, "1", "a failing stable version goes back");
    }

    #[test]
    fn shares_are_stable_and_close_to_the_weight() {
        let keys: Vec<String> = (0..20_000).map(|i| format!("customer-{i}")).collect();
        let share = keys.iter().filter(|k| in_share(k.as_bytes(), 0.2)).count();
        assert!((3_700..=4_300).contains(&share), "{share}");
        for k in &keys[..100] {
            assert_eq!(in_share(k.as_bytes(), 0.2), in_share(k.as_bytes(), 0.2));
            if in_share(k.as_bytes(), 0.1) {
                assert!(
                    in_share(k.as_bytes(), 0.2),
                    "a larger share keeps the smaller one"
                );
            }
        }
    }
}
