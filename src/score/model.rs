//! Loading TorchScript versions: where they are, whether they changed, and whether they work.
//!
//! A version is only served after it has loaded on its device and passed a warm-up: forward
//! passes of zeros with one row and with `max_batch` rows that must return finite `f32`-able
//! values of the configured output shape. Anything else is refused with the reason.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::SystemTime,
};

use sha2::{Digest, Sha256};
use tch::{CModule, Device, Kind, Tensor};

use super::{rollout, store::Repository, InferenceError};
use crate::config::{DeviceChoice, ModelSource};

/// A version found in the repository (or the file), not yet loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub path: PathBuf,
    /// The directory number, or for a single file a digest of its bytes.
    pub version: String,
    /// Changes when the file is replaced.
    pub stamp: Stamp,
}

/// Size and modification time of a model file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub len: u64,
    pub modified: Option<SystemTime>,
}

impl Stamp {
    fn of(path: &Path) -> std::io::Result<Self> {
        let m = std::fs::metadata(path)?;
        Ok(Self {
            len: m.len(),
            modified: m.modified().ok(),
        })
    }
}

/// What a model should serve now: the stable version, and the canary and shadow versions
/// of the repository's rollout ([`super::rollout`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Targets {
    pub stable: Candidate,
    /// With its weight: the share of entities it serves.
    pub canary: Option<(Candidate, f64)>,
    pub shadow: Option<Candidate>,
}

/// The versions that should be served now: for a repository, its rollout (without a rollout
/// file, the highest numbered `<dir>/<n>/model.pt`); for a single file, that file. A single
/// file is read for its digest only when its size or modification time differs from every
/// candidate in `known` (the reloader checks every few seconds). A canary or shadow version
/// whose file is gone is left out.
pub fn targets(source: &ModelSource, known: &[&Candidate]) -> Result<Targets, String> {
    match source {
        ModelSource::File(path) => {
            let stamp = Stamp::of(path).map_err(|e| format!("{}: {e}", path.display()))?;
            if let Some(same) = known.iter().find(|c| c.path == *path && c.stamp == stamp) {
                return Ok(Targets {
                    stable: (*same).clone(),
                    canary: None,
                    shadow: None,
                });
            }
            let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
            let digest = Sha256::digest(&bytes);
            let version: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
            Ok(Targets {
                stable: Candidate {
                    path: path.clone(),
                    version,
                    stamp,
                },
                canary: None,
                shadow: None,
            })
        }
        ModelSource::Repository(location) => {
            let repo = Repository::open(location)?;
            let r = rollout::current(&repo)?;
            Ok(Targets {
                stable: numbered(&repo, &r.stable)?,
                canary: r
                    .canary
                    .and_then(|c| Some((numbered(&repo, &c.version).ok()?, c.weight))),
                shadow: r.shadow.and_then(|v| numbered(&repo, &v).ok()),
            })
        }
    }
}

/// Version `version` of `repo`.
fn numbered(repo: &Repository, version: &str) -> Result<Candidate, String> {
    let file = rollout::model_file(version);
    Ok(Candidate {
        path: repo.local_path(&file),
        version: version.to_owned(),
        stamp: repo.stamp(&file)?,
    })
}

/// Makes `candidate`'s file local before it loads (a version on an object store is
/// downloaded into the cache).
pub fn fetch(source: &ModelSource, candidate: &Candidate) -> Result<(), String> {
    match source {
        ModelSource::Repository(location @ crate::config::RepositoryLocation::Store { .. }) => {
            Repository::open(location)?
                .fetch(&rollout::model_file(&candidate.version))
                .map(|_| ())
        }
        _ => Ok(()),
    }
}

/// Resolves the configured device; `cuda` on a machine without CUDA is an error, `auto`
/// falls back to the CPU.
pub fn device(choice: DeviceChoice) -> Result<Device, String> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Auto => Ok(Device::cuda_if_available()),
        DeviceChoice::Cuda(i) => {
            let n = tch::Cuda::device_count();
            if !tch::Cuda::is_available() || i as i64 >= n {
                Err(format!(
                    "CUDA device {i} is not available (CUDA devices: {n}); use device = \"cpu\" \
                     or \"auto\""
                ))
            } else {
                Ok(Device::Cuda(i))
            }
        }
    }
}

/// How a model's tensors must look.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Features per row.
    pub features: usize,
    /// Values per row returned.
    pub outputs: usize,
    /// Rows of the warm-up's large batch.
    pub max_batch: usize,
}

/// A loaded, warmed-up version.
pub struct LoadedModel {
    module: CModule,
    pub version: Arc<str>,
    pub device: Device,
    pub candidate: Candidate,
    shape: Shape,
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel")
            .field("version", &self.version)
            .field("device", &self.device)
            .field("path", &self.candidate.path)
            .finish()
    }
}

impl LoadedModel {
    /// Loads `candidate` on `device` and warms it up. Blocking; seconds for large models.
    pub fn load(candidate: Candidate, device: Device, shape: Shape) -> Result<Self, String> {
        let mut module = CModule::load_on_device(&candidate.path, device)
            .map_err(|e| format!("not a loadable TorchScript file: {}", first_line(&e)))?;
        module.set_eval();
        let this = Self {
            module,
            version: Arc::from(candidate.version.as_str()),
            device,
            candidate,
            shape,
        };
        for rows in [1, shape.max_batch] {
            let zeros = vec![0f32; rows * shape.features];
            let out = this
                .forward(&zeros, rows)
                .map_err(|e| format!("warm-up with {rows} row(s) failed: {e}"))?;
            if let Some(bad) = out.iter().find(|v| !v.is_finite()) {
                return Err(format!(
                    "warm-up with {rows} row(s) returned {bad} for an input of zeros"
                ));
            }
        }
        Ok(this)
    }

    /// One forward pass over `rows` rows of `x` (row-major); `rows × outputs` values.
    pub fn forward(&self, x: &[f32], rows: usize) -> Result<Vec<f32>, InferenceError> {
        let _no_grad = tch::no_grad_guard();
        let (n, f) = (rows as i64, self.shape.features as i64);
        let input = Tensor::f_from_slice(x)
            .and_then(|t| t.f_view([n, f]))
            .and_then(|t| t.f_to_device(self.device))
            .map_err(|e| InferenceError::Raised(first_line(&e)))?;
        let out = self
            .module
            .forward_ts(&[input])
            .map_err(|e| InferenceError::Raised(first_line(&e)))?;
        let size = out.size();
        let w = self.shape.outputs as i64;
        let fits = match size.as_slice() {
            [m] => *m == n && w == 1,
            [m, k] => *m == n && *k == w,
            _ => false,
        };
        if !fits {
            return Err(InferenceError::WrongShape {
                got: size,
                expected: if w == 1 {
                    format!("[{n}] or [{n}, 1]")
                } else {
                    format!("[{n}, {w}]")
                },
            });
        }
        let out = out
            .f_to_device(Device::Cpu)
            .and_then(|t| t.f_to_kind(Kind::Float))
            .and_then(|t| t.f_contiguous())
            .and_then(|t| t.f_view([-1]))
            .map_err(|e| InferenceError::Raised(first_line(&e)))?;
        Vec::<f32>::try_from(&out).map_err(|e| InferenceError::Raised(first_line(&e)))
    }
}

/// libtorch errors carry a C++ backtrace; the first line says what went wrong.
fn first_line(e: &impl std::fmt::Display) -> String {
    let text = e.to_string();
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let first = lines.next().unwrap_or_default().trim().to_owned();
    // TorchScript exceptions put the Python-level message on a later line.
    match text
        .lines()
        .find(|l| l.contains("Exception:") || l.contains("Error:"))
    {
        Some(detail) if !first.contains(detail.trim()) => format!("{first} {}", detail.trim()),
        _ => first,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_come_from_the_repository_or_the_file_digest() {
        let dir = tempfile::tempdir().unwrap();
        for v in ["1", "10", "2", "notes"] {
            std::fs::create_dir_all(dir.path().join(v)).unwrap();
            std::fs::write(dir.path().join(v).join("model.pt"), v).unwrap();
        }
        std::fs::create_dir_all(dir.path().join("11")).unwrap(); // no model.pt yet
        let repo = ModelSource::Repository(crate::config::RepositoryLocation::Local(
            dir.path().to_owned(),
        ));
        assert_eq!(targets(&repo, &[]).unwrap().stable.version, "10");

        let file = dir.path().join("one.pt");
        std::fs::write(&file, b"first").unwrap();
        let source = ModelSource::File(file.clone());
        let first = targets(&source, &[]).unwrap().stable;
        assert_eq!(first.version.len(), 12);
        assert_eq!(targets(&source, &[&first]).unwrap().stable, first);
        std::fs::write(&file, b"second, longer").unwrap();
        let second = targets(&source, &[&first]).unwrap().stable;
        assert_ne!(
            second.version, first.version,
            "a replaced file is a new version"
        );
    }
}
