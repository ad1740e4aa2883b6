//! A model repository where it lives: a local folder, or a prefix of an object store
//! (`object_store`: S3, GCS, Azure, …), with the same few operations, all blocking (they run
//! on the reloader's and the trainer's blocking threads).
//!
//! Both make a new object visible only when complete: locally, write to a hidden name, sync,
//! then rename; on an object store a put is atomic. A version is `<n>/model.pt`, so it exists
//! once that object does: publication writes `decision.json` first and `model.pt` last. An
//! object store's versions are downloaded into the cache folder (write, then rename) before
//! libtorch loads them; nothing else is cached, so every instance reads the same rollout.
//!
//! Object store calls run on a small runtime of their own, from a fresh thread each (a caller
//! may be on a thread of another runtime, where blocking on a future is not allowed).

use std::{
    collections::HashMap,
    fs,
    io::Write,
    path::{Path, PathBuf},
    sync::{Arc, LazyLock, Mutex},
    time::SystemTime,
};

use futures::TryStreamExt;
use object_store::{path::Path as ObjectPath, ObjectStore, PutPayload};

use super::model::Stamp;
use crate::config::RepositoryLocation;

/// A model repository, opened.
#[derive(Clone)]
pub enum Repository {
    Local(PathBuf),
    Store {
        store: Arc<dyn ObjectStore>,
        prefix: ObjectPath,
        url: String,
        cache: PathBuf,
    },
}

impl std::fmt::Debug for Repository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_string())
    }
}

impl std::fmt::Display for Repository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Local(p) => write!(f, "{}", p.display()),
            Self::Store { url, .. } => f.write_str(url),
        }
    }
}

static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("sluice-repository")
        .enable_all()
        .build()
        .expect("a runtime for the model repository")
});

/// Object store clients by URL and options, so that a reloader checking every few seconds
/// reuses its connections.
static STORES: LazyLock<Mutex<HashMap<String, Opened>>> = LazyLock::new(Mutex::default);

/// A client and the prefix its URL names.
type Opened = (Arc<dyn ObjectStore>, ObjectPath);

fn block<T: Send>(f: impl std::future::Future<Output = T> + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| RUNTIME.block_on(f))
            .join()
            .expect("an object store call panicked")
    })
}

fn io(what: &Path) -> impl Fn(std::io::Error) -> String + '_ {
    move |e| format!("{}: {e}", what.display())
}

/// Writes `bytes` to `path` under a hidden name, syncs, and renames it into place.
fn write_local(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let dir = path.parent().expect("a file in a folder");
    fs::create_dir_all(dir).map_err(io(dir))?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let staging = dir.join(format!(".{name}.{}", std::process::id()));
    let mut f = fs::File::create(&staging).map_err(io(&staging))?;
    f.write_all(bytes).map_err(io(&staging))?;
    f.sync_all().map_err(io(&staging))?;
    fs::rename(&staging, path).map_err(io(path))?;
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

impl Repository {
    /// Opens `location` (an object store client is made once per URL and options).
    pub fn open(location: &RepositoryLocation) -> Result<Self, String> {
        match location {
            RepositoryLocation::Local(dir) => Ok(Self::Local(dir.clone())),
            RepositoryLocation::Store {
                url,
                options,
                cache,
            } => {
                let key = format!("{url} {options:?}");
                let mut stores = STORES.lock().expect("never poisoned");
                let (store, prefix) = match stores.get(&key) {
                    Some(s) => s.clone(),
                    None => {
                        let (store, prefix) = object_store::parse_url_opts(url, options.iter())
                            .map_err(|e| format!("{url}: {e}"))?;
                        let s = (Arc::<dyn ObjectStore>::from(store), prefix);
                        stores.insert(key, s.clone());
                        s
                    }
                };
                Ok(Self::Store {
                    store,
                    prefix,
                    url: url.to_string(),
                    cache: cache.clone(),
                })
            }
        }
    }

    /// A local folder where this process keeps its own files for the repository: the folder
    /// itself, or the cache of an object store.
    pub fn work_dir(&self) -> &Path {
        match self {
            Self::Local(dir) => dir,
            Self::Store { cache, .. } => cache,
        }
    }

    fn object(prefix: &ObjectPath, rel: &str) -> ObjectPath {
        rel.split('/')
            .fold(prefix.clone(), |path, part| path.child(part))
    }

    /// The numbered versions that hold a `model.pt`, in order.
    pub fn versions(&self) -> Result<Vec<u64>, String> {
        let mut out: Vec<u64> = match self {
            Self::Local(dir) => fs::read_dir(dir)
                .map_err(io(dir))?
                .flatten()
                .filter_map(|e| {
                    let n: u64 = e.file_name().to_str()?.parse().ok()?;
                    e.path().join("model.pt").is_file().then_some(n)
                })
                .collect(),
            Self::Store {
                store, prefix, url, ..
            } => {
                let listed: Vec<object_store::ObjectMeta> =
                    block(store.list(Some(prefix)).try_collect())
                        .map_err(|e| format!("listing {url}: {e}"))?;
                let depth = prefix.parts().count();
                listed
                    .iter()
                    .filter_map(|m| {
                        let parts: Vec<_> = m.location.parts().skip(depth).collect();
                        match parts.as_slice() {
                            [v, f] if f.as_ref() == "model.pt" => v.as_ref().parse().ok(),
                            _ => None,
                        }
                    })
                    .collect()
            }
        };
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }

    /// The bytes of `rel`, if it exists.
    pub fn read(&self, rel: &str) -> Result<Option<Vec<u8>>, String> {
        match self {
            Self::Local(dir) => {
                let path = dir.join(rel);
                match fs::read(&path) {
                    Ok(b) => Ok(Some(b)),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(format!("{}: {e}", path.display())),
                }
            }
            Self::Store {
                store, prefix, url, ..
            } => {
                let at = Self::object(prefix, rel);
                block(async {
                    match store.get(&at).await {
                        Ok(r) => r.bytes().await.map(|b| Some(b.to_vec())),
                        Err(object_store::Error::NotFound { .. }) => Ok(None),
                        Err(e) => Err(e),
                    }
                })
                .map_err(|e| format!("{url}/{rel}: {e}"))
            }
        }
    }

    /// Writes `rel` whole, visible only when complete.
    pub fn write(&self, rel: &str, bytes: &[u8]) -> Result<(), String> {
        match self {
            Self::Local(dir) => write_local(&dir.join(rel), bytes),
            Self::Store {
                store, prefix, url, ..
            } => {
                let at = Self::object(prefix, rel);
                let payload = PutPayload::from(bytes.to_vec());
                block(store.put(&at, payload))
                    .map(|_| ())
                    .map_err(|e| format!("writing {url}/{rel}: {e}"))
            }
        }
    }

    /// Size and modification time of `rel`.
    pub fn stamp(&self, rel: &str) -> Result<Stamp, String> {
        match self {
            Self::Local(dir) => {
                let path = dir.join(rel);
                let m = fs::metadata(&path).map_err(io(&path))?;
                Ok(Stamp {
                    len: m.len(),
                    modified: m.modified().ok(),
                })
            }
            Self::Store {
                store, prefix, url, ..
            } => {
                let m = block(store.head(&Self::object(prefix, rel)))
                    .map_err(|e| format!("{url}/{rel}: {e}"))?;
                Ok(Stamp {
                    len: m.size,
                    modified: Some(SystemTime::from(m.last_modified)),
                })
            }
        }
    }

    /// Where libtorch loads `rel` from: the file itself, or its copy in the cache.
    pub fn local_path(&self, rel: &str) -> PathBuf {
        self.work_dir().join(rel)
    }

    /// Makes `rel` a local file (an object store's is downloaded into the cache, write then
    /// rename); returns its path.
    pub fn fetch(&self, rel: &str) -> Result<PathBuf, String> {
        let path = self.local_path(rel);
        if let Self::Store { .. } = self {
            let bytes = self
                .read(rel)?
                .ok_or_else(|| format!("{self}/{rel} does not exist"))?;
            write_local(&path, &bytes)?;
        }
        Ok(path)
    }

    /// Publishes `version` with `files` (name and bytes; `model.pt` last): locally a folder
    /// assembled under a hidden name and renamed into place, on an object store the objects
    /// in order. Fails if the version exists.
    pub fn publish(&self, version: &str, files: &[(&str, &[u8])]) -> Result<(), String> {
        match self {
            Self::Local(dir) => {
                let staging = dir.join(format!(".publishing-{version}-{}", std::process::id()));
                let result = (|| {
                    fs::create_dir_all(&staging).map_err(io(&staging))?;
                    for (name, bytes) in files {
                        write_local(&staging.join(name), bytes)?;
                    }
                    let target = dir.join(version);
                    if target.exists() {
                        return Err(format!(
                            "{} exists already: another trainer published version {version}",
                            target.display()
                        ));
                    }
                    fs::rename(&staging, &target).map_err(io(&target))?;
                    if let Ok(d) = fs::File::open(dir) {
                        let _ = d.sync_all();
                    }
                    Ok(())
                })();
                if result.is_err() {
                    let _ = fs::remove_dir_all(&staging);
                }
                result
            }
            Self::Store { .. } => {
                if self.read(&format!("{version}/model.pt"))?.is_some() {
                    return Err(format!(
                        "{self}/{version}/model.pt exists already: another trainer published \
                         version {version}"
                    ));
                }
                for (name, bytes) in files {
                    self.write(&format!("{version}/{name}"), bytes)?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_local_repository_lists_reads_writes_and_publishes() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::Local(dir.path().to_owned());
        assert_eq!(repo.versions().unwrap(), Vec::<u64>::new());
        repo.publish("2", &[("decision.json", b"{}"), ("model.pt", b"m")])
            .unwrap();
        fs::create_dir_all(dir.path().join("10")).unwrap(); // no model.pt: not a version
        assert_eq!(repo.versions().unwrap(), vec![2]);
        assert!(repo.publish("2", &[("model.pt", b"x")]).is_err());
        assert_eq!(repo.read("2/model.pt").unwrap().as_deref(), Some(&b"m"[..]));
        assert_eq!(repo.read("3/model.pt").unwrap(), None);
        repo.write("rollout.json", b"{}").unwrap();
        assert_eq!(repo.stamp("rollout.json").unwrap().len, 2);
        assert_eq!(
            repo.fetch("2/model.pt").unwrap(),
            dir.path().join("2/model.pt")
        );
        let left: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(left.is_empty(), "no staging left: {left:?}");
    }
}
