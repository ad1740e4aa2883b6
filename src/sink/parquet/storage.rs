//! Where finished files and manifests live: a local folder, or an object store through the
//! `object_store` crate. Both make an object visible atomically and only when complete:
//! locally by fsync + rename (+ fsync of the folder), remotely by a single PUT or a completed
//! multipart upload.

use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
    sync::Arc,
};

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::{path::Path as ObjectPath, ObjectStore, PutPayload, WriteMultipart};
use thiserror::Error;

use crate::config::Location;

/// A storage failure, with the object it concerns.
#[derive(Debug, Error)]
pub enum StorageError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Object {
        path: String,
        #[source]
        source: object_store::Error,
    },
    #[error("cannot open {location}: {source}")]
    Open {
        location: String,
        #[source]
        source: object_store::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StorageError + '_ {
    move |source| StorageError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// A root folder or bucket prefix, plus a local folder for files being written.
pub enum Storage {
    Local {
        root: PathBuf,
        tmp: PathBuf,
    },
    Remote {
        store: Arc<dyn ObjectStore>,
        prefix: ObjectPath,
        tmp: PathBuf,
    },
}

impl Storage {
    /// Opens a location; `pipeline` scopes the temporary folder.
    pub fn open(
        location: &Location,
        options: &std::collections::BTreeMap<String, String>,
        spool_dir: &Path,
        pipeline: &str,
    ) -> Result<Self, StorageError> {
        match location {
            Location::Local(root) => {
                let tmp = root.join("_sluice/tmp").join(pipeline);
                fs::create_dir_all(&tmp).map_err(io(&tmp))?;
                Ok(Self::Local {
                    root: root.clone(),
                    tmp,
                })
            }
            Location::ObjectStore(url) => {
                let (store, prefix) =
                    object_store::parse_url_opts(url, options.iter()).map_err(|source| {
                        StorageError::Open {
                            location: url.to_string(),
                            source,
                        }
                    })?;
                let tmp = spool_dir.join(pipeline);
                fs::create_dir_all(&tmp).map_err(io(&tmp))?;
                Ok(Self::Remote {
                    store: Arc::from(store),
                    prefix,
                    tmp,
                })
            }
        }
    }

    /// The local folder for files being written.
    pub fn tmp_dir(&self) -> &Path {
        match self {
            Self::Local { tmp, .. } | Self::Remote { tmp, .. } => tmp,
        }
    }

    fn object(prefix: &ObjectPath, rel: &str) -> ObjectPath {
        let mut path = prefix.clone();
        for part in rel.split('/') {
            path = path.child(part);
        }
        path
    }

    /// Removes leftover temporary files whose names start with `prefix`.
    pub fn clean_tmp(&self, prefix: &str) -> Result<usize, StorageError> {
        let dir = self.tmp_dir();
        let mut removed = 0;
        for entry in fs::read_dir(dir).map_err(io(dir))? {
            let entry = entry.map_err(io(dir))?;
            if entry.file_name().to_string_lossy().starts_with(prefix) {
                fs::remove_file(entry.path()).map_err(io(&entry.path()))?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Makes a finished local temporary file visible at `rel`, atomically. Returns its size.
    pub async fn publish(&self, tmp_file: &Path, rel: &str) -> Result<u64, StorageError> {
        let size = fs::metadata(tmp_file).map_err(io(tmp_file))?.len();
        match self {
            Self::Local { root, .. } => {
                let target = root.join(rel);
                let dir = target.parent().expect("a file has a folder");
                fs::create_dir_all(dir).map_err(io(dir))?;
                fs::File::open(tmp_file)
                    .and_then(|f| f.sync_all())
                    .map_err(io(tmp_file))?;
                fs::rename(tmp_file, &target).map_err(io(&target))?;
                sync_dir(dir)?;
            }
            Self::Remote { store, prefix, .. } => {
                let path = Self::object(prefix, rel);
                let err = |source| StorageError::Object {
                    path: path.to_string(),
                    source,
                };
                let upload = store.put_multipart(&path).await.map_err(err)?;
                let mut writer = WriteMultipart::new_with_chunk_size(upload, 16 << 20);
                let mut file = tokio::fs::File::open(tmp_file)
                    .await
                    .map_err(io(tmp_file))?;
                let mut buf = vec![0u8; 1 << 20];
                loop {
                    use tokio::io::AsyncReadExt;
                    let n = file.read(&mut buf).await.map_err(io(tmp_file))?;
                    if n == 0 {
                        break;
                    }
                    writer.wait_for_capacity(4).await.map_err(err)?;
                    writer.write(&buf[..n]);
                }
                writer.finish().await.map_err(err)?;
                fs::remove_file(tmp_file).map_err(io(tmp_file))?;
            }
        }
        Ok(size)
    }

    /// Writes a small object atomically (manifests). Locally it is staged in the temporary
    /// folder as `<staging>.tmp`; name it with the partition's temporary prefix so that a
    /// crash's leftover is removed when the partition is next assigned.
    pub async fn put(&self, rel: &str, data: Bytes, staging: &str) -> Result<(), StorageError> {
        match self {
            Self::Local { root, tmp } => {
                let target = root.join(rel);
                let dir = target.parent().expect("a file has a folder");
                fs::create_dir_all(dir).map_err(io(dir))?;
                let staging = tmp.join(format!("{staging}.tmp"));
                let mut f = fs::File::create(&staging).map_err(io(&staging))?;
                f.write_all(&data)
                    .and_then(|_| f.sync_all())
                    .map_err(io(&staging))?;
                fs::rename(&staging, &target).map_err(io(&target))?;
                sync_dir(dir)
            }
            Self::Remote { store, prefix, .. } => {
                let path = Self::object(prefix, rel);
                store
                    .put(&path, PutPayload::from_bytes(data))
                    .await
                    .map(|_| ())
                    .map_err(|source| StorageError::Object {
                        path: path.to_string(),
                        source,
                    })
            }
        }
    }

    /// Reads an object; `None` if it does not exist.
    pub async fn get(&self, rel: &str) -> Result<Option<Bytes>, StorageError> {
        match self {
            Self::Local { root, .. } => {
                let path = root.join(rel);
                match fs::read(&path) {
                    Ok(data) => Ok(Some(data.into())),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(io(&path)(e)),
                }
            }
            Self::Remote { store, prefix, .. } => {
                let path = Self::object(prefix, rel);
                match store.get(&path).await {
                    Ok(r) => r.bytes().await.map(Some),
                    Err(object_store::Error::NotFound { .. }) => Ok(None),
                    Err(e) => Err(e),
                }
                .map_err(|source| StorageError::Object {
                    path: path.to_string(),
                    source,
                })
            }
        }
    }

    /// Whether an object exists.
    pub async fn exists(&self, rel: &str) -> Result<bool, StorageError> {
        match self {
            Self::Local { root, .. } => Ok(root.join(rel).is_file()),
            Self::Remote { store, prefix, .. } => {
                let path = Self::object(prefix, rel);
                match store.head(&path).await {
                    Ok(_) => Ok(true),
                    Err(object_store::Error::NotFound { .. }) => Ok(false),
                    Err(source) => Err(StorageError::Object {
                        path: path.to_string(),
                        source,
                    }),
                }
            }
        }
    }

    /// Names (not paths) of the objects directly in folder `rel`, sorted.
    pub async fn list(&self, rel: &str) -> Result<Vec<String>, StorageError> {
        let mut names = match self {
            Self::Local { root, .. } => {
                let dir = root.join(rel);
                match fs::read_dir(&dir) {
                    Ok(entries) => entries
                        .filter_map(|e| e.ok())
                        .filter(|e| e.path().is_file())
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect(),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => vec![],
                    Err(e) => return Err(io(&dir)(e)),
                }
            }
            Self::Remote { store, prefix, .. } => {
                let path = Self::object(prefix, rel);
                let listing = store
                    .list_with_delimiter(Some(&path))
                    .await
                    .map_err(|source| StorageError::Object {
                        path: path.to_string(),
                        source,
                    })?;
                listing
                    .objects
                    .into_iter()
                    .filter_map(|o| o.location.filename().map(str::to_owned))
                    .collect::<Vec<_>>()
            }
        };
        names.sort();
        Ok(names)
    }

    /// Deletes an object if it exists.
    pub async fn delete(&self, rel: &str) -> Result<(), StorageError> {
        match self {
            Self::Local { root, .. } => {
                let path = root.join(rel);
                match fs::remove_file(&path) {
                    Ok(()) => Ok(()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    Err(e) => Err(io(&path)(e)),
                }
            }
            Self::Remote { store, prefix, .. } => {
                let path = Self::object(prefix, rel);
                match store.delete(&path).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                    Err(source) => Err(StorageError::Object {
                        path: path.to_string(),
                        source,
                    }),
                }
            }
        }
    }
}

fn sync_dir(dir: &Path) -> Result<(), StorageError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

/// Collects the names of every object below `rel`, recursively (tests and tools).
pub async fn list_recursive(storage: &Storage, rel: &str) -> Result<Vec<String>, StorageError> {
    match storage {
        Storage::Local { root, .. } => {
            let mut out = Vec::new();
            let mut stack = vec![root.join(rel)];
            while let Some(dir) = stack.pop() {
                let Ok(entries) = fs::read_dir(&dir) else {
                    continue;
                };
                for e in entries.flatten() {
                    let p = e.path();
                    if p.is_dir() {
                        stack.push(p);
                    } else if let Ok(r) = p.strip_prefix(root) {
                        out.push(r.to_string_lossy().into_owned());
                    }
                }
            }
            Ok(out)
        }
        Storage::Remote { store, prefix, .. } => {
            let base = Storage::object(prefix, rel);
            let items: Vec<_> = store
                .list(Some(&base))
                .try_collect()
                .await
                .map_err(|source| StorageError::Object {
                    path: base.to_string(),
                    source,
                })?;
            Ok(items
                .into_iter()
                .map(|o| {
                    o.location
                        .prefix_match(prefix)
                        .map(|parts| {
                            parts
                                .map(|p| p.as_ref().to_owned())
                                .collect::<Vec<_>>()
                                .join("/")
                        })
                        .unwrap_or_else(|| o.location.to_string())
                })
                .collect())
        }
    }
}
