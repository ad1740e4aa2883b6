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
use object_store::{path::Path as ObjectPath, ObjectStore, PutMode, PutOptions, PutPayload};
use thiserror::Error;
use tracing::warn;

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
    /// A manifest is already there: another writer (a member that lost its partitions and
    /// goes on, or a second pipeline of the same name on this root) wrote this segment.
    #[error(
        "{path} already exists: another process writes this pipeline's segments under this \
         root (a stale member, or a second pipeline with the same name)"
    )]
    Exists { path: String },
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
                if size <= MULTIPART_CHUNK as u64 {
                    // One request where one part would do (review finding A11).
                    let data = tokio::fs::read(tmp_file).await.map_err(io(tmp_file))?;
                    store
                        .put(&path, PutPayload::from(data))
                        .await
                        .map_err(err)?;
                } else {
                    let mut upload = store.put_multipart(&path).await.map_err(err)?;
                    let sent = match upload_parts(upload.as_mut(), tmp_file, &path).await {
                        Ok(()) => upload.complete().await.map(|_| ()).map_err(err),
                        Err(e) => Err(e),
                    };
                    if sent.is_err() {
                        // Parts of an upload never completed nor aborted are kept (and billed)
                        // until a lifecycle rule removes them (review finding A11).
                        if let Err(error) = upload.abort().await {
                            warn!(object = %path, %error,
                                  "Cannot abort a failed multipart upload; a bucket lifecycle \
                                   rule (AbortIncompleteMultipartUpload) removes it.");
                        }
                    }
                    sent?;
                }
                fs::remove_file(tmp_file).map_err(io(tmp_file))?;
            }
        }
        Ok(size)
    }

    /// Creates a small object atomically (manifests), failing with [`StorageError::Exists`]
    /// if it is already there, so that two writers of one segment cannot silently replace each
    /// other's manifest (review finding A11). Locally it is staged in the temporary folder as
    /// `<staging>.tmp`, named with the partition's temporary prefix so that a crash's leftover
    /// is removed when the partition is next assigned, then linked into place (a link, unlike
    /// a rename, never replaces). On object stores it is a conditional put (`If-None-Match`);
    /// where the store does not implement one (S3 unless `conditional_put` is configured), a
    /// plain put, with a warning once.
    pub async fn put_new(&self, rel: &str, data: Bytes, staging: &str) -> Result<(), StorageError> {
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
                let linked = fs::hard_link(&staging, &target);
                fs::remove_file(&staging).map_err(io(&staging))?;
                match linked {
                    Ok(()) => sync_dir(dir),
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        Err(StorageError::Exists {
                            path: target.display().to_string(),
                        })
                    }
                    Err(e) => Err(io(&target)(e)),
                }
            }
            Self::Remote { store, prefix, .. } => {
                let path = Self::object(prefix, rel);
                let create = PutOptions::from(PutMode::Create);
                let result = match store
                    .put_opts(&path, PutPayload::from_bytes(data.clone()), create)
                    .await
                {
                    Err(object_store::Error::NotImplemented) => {
                        static ONCE: std::sync::Once = std::sync::Once::new();
                        ONCE.call_once(|| {
                            warn!(
                                "This object store does not do conditional puts, so manifests \
                                   are not fenced against a second writer; for S3, set \
                                   `conditional_put = \"etag\"` in sink.parquet.storage_options."
                            );
                        });
                        store.put(&path, PutPayload::from_bytes(data)).await
                    }
                    other => other,
                };
                match result {
                    Ok(_) => Ok(()),
                    Err(object_store::Error::AlreadyExists { .. })
                    | Err(object_store::Error::Precondition { .. }) => Err(StorageError::Exists {
                        path: path.to_string(),
                    }),
                    Err(source) => Err(StorageError::Object {
                        path: path.to_string(),
                        source,
                    }),
                }
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

/// Part size of multipart uploads; files up to this size go up in one put. `validate`
/// bounds `max_file_size` on object stores by it.
const MULTIPART_CHUNK: usize = crate::config::OBJECT_STORE_PART_SIZE as usize;

/// At most this many parts of one file are in flight at once (memory: parts × part size).
const PARTS_IN_FLIGHT: usize = 4;

/// Sends `tmp_file` as the parts of `upload`, in order, a few at a time. The caller completes
/// the upload, or aborts it when this fails: a part's failure is known here, while the upload
/// can still be aborted (`WriteMultipart::finish` returns a failed part's error without
/// aborting).
async fn upload_parts(
    upload: &mut dyn object_store::MultipartUpload,
    tmp_file: &Path,
    path: &ObjectPath,
) -> Result<(), StorageError> {
    use futures::stream::{FuturesUnordered, StreamExt};
    use tokio::io::AsyncReadExt;
    let mut file = tokio::fs::File::open(tmp_file)
        .await
        .map_err(io(tmp_file))?;
    let mut in_flight: FuturesUnordered<object_store::UploadPart> = FuturesUnordered::new();
    let failed = |source: object_store::Error| StorageError::Object {
        path: path.to_string(),
        source,
    };
    loop {
        let mut part = Vec::with_capacity(MULTIPART_CHUNK);
        while part.len() < MULTIPART_CHUNK {
            let read = (&mut file)
                .take((MULTIPART_CHUNK - part.len()) as u64)
                .read_to_end(&mut part)
                .await
                .map_err(io(tmp_file))?;
            if read == 0 {
                break;
            }
        }
        if part.is_empty() {
            break;
        }
        let last = part.len() < MULTIPART_CHUNK;
        while in_flight.len() >= PARTS_IN_FLIGHT {
            if let Some(sent) = in_flight.next().await {
                sent.map_err(failed)?;
            }
        }
        in_flight.push(upload.put_part(PutPayload::from(part)));
        if last {
            break;
        }
    }
    while let Some(sent) = in_flight.next().await {
        sent.map_err(failed)?;
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use std::{
        fmt,
        sync::{
            atomic::{AtomicBool, AtomicUsize, Ordering},
            Arc,
        },
    };

    use async_trait::async_trait;
    use futures::stream::BoxStream;
    use object_store::{
        memory::InMemory, path::Path as ObjectPath, GetOptions, GetResult, ListResult,
        MultipartUpload, ObjectMeta, ObjectStore, PutMultipartOptions, PutOptions, PutPayload,
        PutResult, UploadPart,
    };

    use super::{Storage, StorageError, MULTIPART_CHUNK};

    /// An in-memory store whose multipart uploads refuse part `fail_part` (counted from 0),
    /// and which records what was asked of it.
    #[derive(Debug, Default)]
    struct Refusing {
        inner: InMemory,
        fail_part: Option<usize>,
        puts: AtomicUsize,
        uploads: AtomicUsize,
        aborted: Arc<AtomicBool>,
    }

    impl fmt::Display for Refusing {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "Refusing")
        }
    }

    #[derive(Debug)]
    struct Upload {
        inner: Box<dyn MultipartUpload>,
        part: usize,
        fail_part: Option<usize>,
        aborted: Arc<AtomicBool>,
    }

    #[async_trait]
    impl MultipartUpload for Upload {
        fn put_part(&mut self, data: PutPayload) -> UploadPart {
            let part = self.part;
            self.part += 1;
            if Some(part) == self.fail_part {
                return Box::pin(async move {
                    Err(object_store::Error::Generic {
                        store: "Refusing",
                        source: format!("part {part} refused").into(),
                    })
                });
            }
            self.inner.put_part(data)
        }

        async fn complete(&mut self) -> object_store::Result<PutResult> {
            self.inner.complete().await
        }

        async fn abort(&mut self) -> object_store::Result<()> {
            self.aborted.store(true, Ordering::Release);
            self.inner.abort().await
        }
    }

    #[async_trait]
    impl ObjectStore for Refusing {
        async fn put_opts(
            &self,
            location: &ObjectPath,
            payload: PutPayload,
            opts: PutOptions,
        ) -> object_store::Result<PutResult> {
            self.puts.fetch_add(1, Ordering::AcqRel);
            self.inner.put_opts(location, payload, opts).await
        }

        async fn put_multipart_opts(
            &self,
            location: &ObjectPath,
            opts: PutMultipartOptions,
        ) -> object_store::Result<Box<dyn MultipartUpload>> {
            self.uploads.fetch_add(1, Ordering::AcqRel);
            Ok(Box::new(Upload {
                inner: self.inner.put_multipart_opts(location, opts).await?,
                part: 0,
                fail_part: self.fail_part,
                aborted: self.aborted.clone(),
            }))
        }

        async fn get_opts(
            &self,
            location: &ObjectPath,
            options: GetOptions,
        ) -> object_store::Result<GetResult> {
            self.inner.get_opts(location, options).await
        }

        async fn delete(&self, location: &ObjectPath) -> object_store::Result<()> {
            self.inner.delete(location).await
        }

        fn list(
            &self,
            prefix: Option<&ObjectPath>,
        ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
            self.inner.list(prefix)
        }

        async fn list_with_delimiter(
            &self,
            prefix: Option<&ObjectPath>,
        ) -> object_store::Result<ListResult> {
            self.inner.list_with_delimiter(prefix).await
        }

        async fn copy(&self, from: &ObjectPath, to: &ObjectPath) -> object_store::Result<()> {
            self.inner.copy(from, to).await
        }

        async fn copy_if_not_exists(
            &self,
            from: &ObjectPath,
            to: &ObjectPath,
        ) -> object_store::Result<()> {
            self.inner.copy_if_not_exists(from, to).await
        }
    }

    /// A storage on `store`, and a finished temporary file of `size` bytes in its folder.
    fn with_file(
        store: Arc<Refusing>,
        size: usize,
    ) -> (tempfile::TempDir, Storage, std::path::PathBuf, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        let file = dir.path().join("segment.parquet.tmp");
        std::fs::write(&file, &data).unwrap();
        let storage = Storage::Remote {
            store,
            prefix: ObjectPath::from("root"),
            tmp: dir.path().to_owned(),
        };
        (dir, storage, file, data)
    }

    #[tokio::test]
    async fn a_small_file_is_one_put_and_a_large_one_goes_up_in_parts() {
        for (size, puts, uploads) in [(1_000, 1, 0), (2 * MULTIPART_CHUNK + 7, 0, 1)] {
            let store = Arc::new(Refusing::default());
            let (_dir, storage, file, data) = with_file(store.clone(), size);
            assert_eq!(
                storage.publish(&file, "dt=1/a.parquet").await.unwrap(),
                size as u64
            );
            assert_eq!(storage.get("dt=1/a.parquet").await.unwrap().unwrap(), data);
            assert!(!file.exists(), "the temporary file is removed");
            assert_eq!(
                store.puts.load(Ordering::Acquire),
                puts,
                "puts of {size} bytes"
            );
            assert_eq!(store.uploads.load(Ordering::Acquire), uploads);
        }
    }

    /// Review finding A11: a multipart upload that fails is aborted (else its parts are kept,
    /// and billed, until a lifecycle rule removes them), whether the first part fails (found
    /// while parts are still being sent) or the last (found only when waiting for them all),
    /// and nothing becomes visible.
    #[tokio::test]
    async fn a_failed_multipart_upload_is_aborted_and_shows_nothing() {
        for fail_part in [0, 2] {
            let store = Arc::new(Refusing {
                fail_part: Some(fail_part),
                ..Default::default()
            });
            let (_dir, storage, file, _) = with_file(store.clone(), 2 * MULTIPART_CHUNK + 7);
            let error = storage.publish(&file, "dt=1/a.parquet").await.unwrap_err();
            assert!(
                matches!(&error, StorageError::Object { path, .. } if path == "root/dt=1/a.parquet"),
                "{error}"
            );
            assert!(error.to_string().contains("refused"), "{error}");
            assert!(
                store.aborted.load(Ordering::Acquire),
                "part {fail_part} failed and the upload was not aborted"
            );
            assert!(!storage.exists("dt=1/a.parquet").await.unwrap());
            assert!(file.exists(), "the temporary file stays for the retry");
        }
    }
}
