//! Safetensors reading through a memory map (single files and sharded checkpoints) and atomic
//! writing with `__metadata__`.

use crate::atomic::AtomicFile;
use crate::layout::checked_numel;
use crate::{DType, Result, Tensor, TensorError, TensorView};
use memmap2::Mmap;
use safetensors::tensor::{Metadata, TensorInfo};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Largest header accepted, as in the reference implementation.
const MAX_HEADER_BYTES: u64 = 100 * 1024 * 1024;

/// One safetensors file, memory-mapped. Tensors handed out share the map (zero-copy).
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: Arc<Mmap>,
    data_start: usize,
    metadata: Metadata,
}

/// The dtype and shape of a stored tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredTensorInfo {
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl SafetensorsFile {
    /// Map and validate `path`. Every header entry is checked against the file's real size
    /// before anything is read.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|e| TensorError::io(&path, "opening", e))?;
        let file_len = file
            .metadata()
            .map_err(|e| TensorError::io(&path, "reading metadata of", e))?
            .len();
        if file_len < 8 {
            return Err(TensorError::InvalidHeader {
                path,
                reason: format!(
                    "the file is {file_len} bytes; a safetensors file starts with an 8-byte header length"
                ),
            });
        }
        // SAFETY: the map is read-only; like every mmap-based loader we assume the file is not
        // truncated by another process while mapped.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| TensorError::io(&path, "mapping", e))?;
        let header_len = diagnose_header(&path, &mmap)?;
        let (n, metadata) = safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| {
            TensorError::InvalidHeader {
                path: path.clone(),
                reason: e.to_string(),
            }
        })?;
        debug_assert_eq!(n, header_len);
        Ok(SafetensorsFile {
            path,
            mmap: Arc::new(mmap),
            data_start: 8 + n,
            metadata,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor names in file order.
    pub fn names(&self) -> Vec<String> {
        self.metadata.offset_keys()
    }

    /// Whether the file has a tensor called `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.metadata.info(name).is_some()
    }

    /// The free-form `__metadata__` map, if the file has one.
    pub fn user_metadata(&self) -> Option<&HashMap<String, String>> {
        self.metadata.metadata().as_ref()
    }

    fn raw_info(&self, name: &str) -> Result<&TensorInfo> {
        self.metadata
            .info(name)
            .ok_or_else(|| TensorError::TensorNotFound {
                path: self.path.clone(),
                name: name.to_string(),
            })
    }

    /// Dtype and shape of `name`, without touching its data.
    pub fn info(&self, name: &str) -> Result<StoredTensorInfo> {
        let info = self.raw_info(name)?;
        let dtype =
            DType::from_safetensors(info.dtype).ok_or_else(|| TensorError::UnsupportedDtype {
                path: self.path.clone(),
                name: name.to_string(),
                dtype: format!("{:?}", info.dtype),
            })?;
        Ok(StoredTensorInfo {
            dtype,
            shape: info.shape.clone(),
        })
    }

    /// The tensor `name`, sharing the memory map.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let info = self.info(name)?;
        let (start, end) = self.raw_info(name)?.data_offsets;
        Tensor::from_mapped(
            self.mmap.clone(),
            self.data_start + start,
            end - start,
            info.dtype,
            &info.shape,
        )
    }

    /// A borrowed view of the tensor `name`.
    pub fn view(&self, name: &str) -> Result<TensorView<'_>> {
        let info = self.info(name)?;
        let (start, end) = self.raw_info(name)?.data_offsets;
        let bytes = &self.mmap[self.data_start + start..self.data_start + end];
        TensorView::from_bytes(bytes, info.dtype, &info.shape)
    }

    /// Drop this file's mapped pages from the process (they are read again from the file if
    /// touched later), so that a layer-by-layer pass over a large checkpoint does not keep every
    /// page it has read resident: pages of a file map count toward RSS.
    pub fn release_pages(&self) {
        #[cfg(unix)]
        if !self.mmap.is_empty() {
            // SAFETY: the map is a read-only private map of a file: dropping its pages loses no
            // data, later reads fault them in again from the file.
            let _ = unsafe {
                self.mmap
                    .unchecked_advise(memmap2::UncheckedAdvice::DontNeed)
            };
        }
    }

    /// Ask the kernel to read the data of `name` into the page cache in the background
    /// (`madvise(WILLNEED)`; nothing is mapped into the process, so RSS does not grow): a
    /// layer-by-layer pass reads the next layer from disk while it computes on this one.
    pub fn prefetch(&self, name: &str) {
        #[cfg(unix)]
        if let Ok(info) = self.raw_info(name) {
            let (start, end) = info.data_offsets;
            let page = 4096;
            let lo = (self.data_start + start) / page * page;
            let hi = (self.data_start + end).min(self.mmap.len());
            if hi > lo {
                let _ = self
                    .mmap
                    .advise_range(memmap2::Advice::WillNeed, lo, hi - lo);
            }
        }
        #[cfg(not(unix))]
        let _ = name;
    }

    /// Every tensor, by name (zero-copy).
    pub fn tensors(&self) -> Result<BTreeMap<String, Tensor>> {
        self.names()
            .into_iter()
            .map(|n| Ok((n.clone(), self.tensor(&n)?)))
            .collect()
    }
}

/// Check the header with messages that name the tensor at fault; returns the header length.
/// The `safetensors` crate re-validates afterwards and remains the parser of record.
fn diagnose_header(path: &Path, bytes: &[u8]) -> Result<usize> {
    let file_len = bytes.len() as u64;
    let invalid = |reason: String| TensorError::InvalidHeader {
        path: path.to_path_buf(),
        reason,
    };
    let mut len_bytes = [0u8; 8];
    len_bytes.copy_from_slice(&bytes[..8]);
    let n = u64::from_le_bytes(len_bytes);
    if n > MAX_HEADER_BYTES {
        return Err(invalid(format!(
            "the header length {n} is larger than the 100 MB limit"
        )));
    }
    if n > file_len - 8 {
        return Err(invalid(format!(
            "the header length {n} goes past the end of the file ({file_len} bytes)"
        )));
    }
    let n = n as usize;
    let header = std::str::from_utf8(&bytes[8..8 + n])
        .map_err(|e| invalid(format!("the header is not UTF-8: {e}")))?;
    let entries: BTreeMap<String, serde_json::Value> = serde_json::from_str(header)
        .map_err(|e| invalid(format!("the header is not a JSON object: {e}")))?;
    let data_len = file_len - 8 - n as u64;
    let mut spans = Vec::new();
    for (name, entry) in &entries {
        if name == "__metadata__" {
            continue;
        }
        let dtype_name = entry
            .get("dtype")
            .and_then(|d| d.as_str())
            .ok_or_else(|| invalid(format!("tensor `{name}` has no dtype string")))?;
        let dtype: safetensors::Dtype =
            serde_json::from_value(serde_json::Value::String(dtype_name.into())).map_err(|_| {
                TensorError::UnsupportedDtype {
                    path: path.to_path_buf(),
                    name: name.clone(),
                    dtype: dtype_name.to_string(),
                }
            })?;
        let shape: Vec<usize> = entry
            .get("shape")
            .and_then(|s| serde_json::from_value(s.clone()).ok())
            .ok_or_else(|| invalid(format!("tensor `{name}` has no valid shape")))?;
        let (start, end): (u64, u64) = entry
            .get("data_offsets")
            .and_then(|s| serde_json::from_value(s.clone()).ok())
            .ok_or_else(|| invalid(format!("tensor `{name}` has no valid data_offsets")))?;
        if end < start {
            return Err(invalid(format!(
                "tensor `{name}` has data_offsets [{start}, {end}] that end before they start"
            )));
        }
        let expected = checked_numel(&shape)
            .and_then(|n| n.checked_mul(dtype.bitsize()))
            .map(|bits| bits.div_ceil(8))
            .ok_or_else(|| {
                invalid(format!(
                    "tensor `{name}` has shape {shape:?} that overflows"
                ))
            })?;
        if (end - start) as u128 != expected as u128 {
            return Err(TensorError::ByteLengthMismatch {
                path: path.to_path_buf(),
                name: name.clone(),
                dtype: dtype_name.to_string(),
                shape,
                expected,
                actual: (end - start) as usize,
            });
        }
        if end > data_len {
            return Err(TensorError::Truncated {
                path: path.to_path_buf(),
                expected: 8 + n as u64 + end,
                actual: file_len,
            });
        }
        spans.push((start, end, name));
    }
    spans.sort();
    let mut cursor = 0;
    for (start, end, name) in &spans {
        if *start != cursor {
            return Err(invalid(format!(
                "tensor `{name}` starts at byte {start} of the data, expected {cursor} (tensors overlap or leave a gap)"
            )));
        }
        cursor = *end;
    }
    if cursor != data_len {
        return Err(invalid(format!(
            "the tensors cover {cursor} bytes of data but the file has {data_len} after the header"
        )));
    }
    Ok(n)
}

/// A checkpoint made of one safetensors file or of shards listed in
/// `model.safetensors.index.json`, as Hugging Face writes them.
pub struct Checkpoint {
    root: PathBuf,
    files: Vec<SafetensorsFile>,
    by_name: BTreeMap<String, usize>,
}

#[derive(serde::Deserialize)]
struct ShardIndex {
    weight_map: BTreeMap<String, String>,
}

impl Checkpoint {
    /// Open a directory (with `model.safetensors.index.json` or `model.safetensors`), a shard
    /// index file (`*.index.json`), or a single `.safetensors` file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if path.is_dir() {
            let index = path.join("model.safetensors.index.json");
            let single = path.join("model.safetensors");
            if index.is_file() {
                return Self::open_index(&index);
            }
            if single.is_file() {
                return Self::open_single(&single);
            }
            return Err(TensorError::NoCheckpoint {
                path: path.to_path_buf(),
            });
        }
        if path.to_string_lossy().ends_with(".index.json") {
            Self::open_index(path)
        } else {
            Self::open_single(path)
        }
    }

    fn open_single(path: &Path) -> Result<Self> {
        let file = SafetensorsFile::open(path)?;
        let by_name = file.names().into_iter().map(|n| (n, 0)).collect();
        Ok(Checkpoint {
            root: path.to_path_buf(),
            files: vec![file],
            by_name,
        })
    }

    fn open_index(index_path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(index_path)
            .map_err(|e| TensorError::io(index_path, "reading", e))?;
        let index: ShardIndex =
            serde_json::from_str(&text).map_err(|e| TensorError::InvalidIndex {
                index: index_path.to_path_buf(),
                reason: e.to_string(),
            })?;
        let dir = index_path.parent().unwrap_or(Path::new("."));
        let mut shard_ids: BTreeMap<&str, usize> = BTreeMap::new();
        let mut files = Vec::new();
        let mut by_name = BTreeMap::new();
        for (name, shard) in &index.weight_map {
            // Shard names come from an untrusted file: only plain names beside the index.
            let plain = Path::new(shard)
                .file_name()
                .is_some_and(|f| f == shard.as_str());
            if !plain {
                return Err(TensorError::InvalidIndex {
                    index: index_path.to_path_buf(),
                    reason: format!("shard `{shard}` for tensor `{name}` is not a plain file name"),
                });
            }
            let id = match shard_ids.get(shard.as_str()) {
                Some(&id) => id,
                None => {
                    let shard_path = dir.join(shard);
                    if !shard_path.is_file() {
                        return Err(TensorError::MissingShard {
                            index: index_path.to_path_buf(),
                            shard: shard.clone(),
                            name: name.clone(),
                            reason: format!("{} does not exist", shard_path.display()),
                        });
                    }
                    files.push(SafetensorsFile::open(&shard_path)?);
                    shard_ids.insert(shard, files.len() - 1);
                    files.len() - 1
                }
            };
            if !files[id].contains(name) {
                return Err(TensorError::TensorNotFound {
                    path: files[id].path().to_path_buf(),
                    name: name.clone(),
                });
            }
            by_name.insert(name.clone(), id);
        }
        Ok(Checkpoint {
            root: index_path.to_path_buf(),
            files,
            by_name,
        })
    }

    /// The file or index this checkpoint was opened from.
    pub fn path(&self) -> &Path {
        &self.root
    }

    /// The underlying files (one, or one per shard).
    pub fn files(&self) -> &[SafetensorsFile] {
        &self.files
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    fn file_of(&self, name: &str) -> Result<&SafetensorsFile> {
        self.by_name
            .get(name)
            .map(|&i| &self.files[i])
            .ok_or_else(|| TensorError::TensorNotFound {
                path: self.root.clone(),
                name: name.to_string(),
            })
    }

    /// Dtype and shape of `name`.
    pub fn info(&self, name: &str) -> Result<StoredTensorInfo> {
        self.file_of(name)?.info(name)
    }

    /// The tensor `name`, zero-copy.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        self.file_of(name)?.tensor(name)
    }

    /// Start reading the tensors whose names begin with `prefix` into the page cache (see
    /// [`SafetensorsFile::prefetch`]).
    pub fn prefetch_prefix(&self, prefix: &str) {
        for (name, &id) in self.by_name.range(prefix.to_string()..) {
            if !name.starts_with(prefix) {
                break;
            }
            self.files[id].prefetch(name);
        }
    }

    /// Drop every mapped page of every shard from the process (see
    /// [`SafetensorsFile::release_pages`]).
    pub fn release_pages(&self) {
        for f in &self.files {
            f.release_pages();
        }
    }

    /// Bytes of every tensor's data as stored.
    pub fn stored_bytes(&self) -> Result<u64> {
        let mut total = 0u64;
        for name in self.by_name.keys() {
            let info = self.info(name)?;
            total += (checked_numel(&info.shape).unwrap_or(0) * info.dtype.size_in_bytes()) as u64;
        }
        Ok(total)
    }
}

/// Tensors written one at a time to a scratch file as they are produced (a model quantized layer
/// by layer), then laid out as one safetensors file by [`TensorSpill::finish`]: the result is
/// byte for byte what [`save_safetensors`] writes for the same tensors held in memory, since the
/// layout depends only on names, dtypes and shapes.
pub struct TensorSpill {
    path: PathBuf,
    file: File,
    entries: Vec<(String, SpilledTensor)>,
    len: u64,
    /// Files of [`PlacedFiles`] given up ([`TensorSpill::adopt`]): their tensors are read back
    /// from them, and they are deleted at the end.
    adopted: Vec<(PathBuf, File)>,
}

/// A tensor's place in a [`TensorSpill`].
#[derive(Clone, Debug)]
struct SpilledTensor {
    dtype: DType,
    shape: Vec<usize>,
    /// 0: the spill file; `i > 0`: adopted file `i - 1`.
    file: usize,
    offset: u64,
    len: u64,
}

impl TensorSpill {
    /// Create the scratch file `path` (the caller removes it, usually inside a temporary
    /// directory).
    pub fn create(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| TensorError::io(&path, "creating", e))?;
        Ok(TensorSpill {
            path,
            file,
            entries: Vec::new(),
            len: 0,
            adopted: Vec::new(),
        })
    }

    /// Append one tensor's data. Names must be unique.
    pub fn push<S: TensorSource>(&mut self, name: &str, tensor: &S) -> Result<()> {
        if self.entries.iter().any(|(n, _)| n == name) {
            return Err(TensorError::Write {
                path: self.path.clone(),
                name: name.to_string(),
                reason: "a tensor of that name was already written".into(),
            });
        }
        let mut writer = std::io::BufWriter::with_capacity(1 << 20, &self.file);
        let mut counter = CountingWriter {
            inner: &mut writer,
            count: 0,
        };
        tensor.write_data(&mut counter)?;
        let written = counter.count;
        writer
            .flush()
            .map_err(|e| TensorError::io(&self.path, "writing", e))?;
        self.entries.push((
            name.to_string(),
            SpilledTensor {
                dtype: tensor.dtype(),
                shape: tensor.shape().to_vec(),
                file: 0,
                offset: self.len,
                len: written,
            },
        ));
        self.len += written;
        Ok(())
    }

    /// Bytes written so far.
    pub fn bytes(&self) -> u64 {
        self.len
    }

    /// Names written so far, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(n, _)| n.as_str())
    }

    /// Write every tensor into `dir` with [`save_safetensors_sharded`], then delete the scratch
    /// file. Returns the files written.
    pub fn finish(
        self,
        dir: impl AsRef<Path>,
        metadata: Option<&BTreeMap<String, String>>,
        max_shard_bytes: u64,
    ) -> Result<Vec<PathBuf>> {
        let sources: Vec<(String, SpillSource<'_>)> = self
            .entries
            .iter()
            .map(|(name, t)| {
                (
                    name.clone(),
                    SpillSource {
                        spill: &self,
                        tensor: t,
                    },
                )
            })
            .collect();
        let written = save_safetensors_sharded(dir, &sources, metadata, max_shard_bytes)?;
        drop(sources);
        self.discard()?;
        Ok(written)
    }

    /// Delete the scratch file (and any adopted files) without writing anything: the tensors
    /// went elsewhere.
    pub fn discard(self) -> Result<()> {
        let TensorSpill {
            path,
            file,
            adopted,
            ..
        } = self;
        drop(file);
        std::fs::remove_file(&path).map_err(|e| TensorError::io(&path, "removing", e))?;
        for (path, file) in adopted {
            drop(file);
            std::fs::remove_file(&path).map_err(|e| TensorError::io(&path, "removing", e))?;
        }
        Ok(())
    }

    /// Take over the tensors written so far into `placed` (whose layout turned out wrong):
    /// they are read back from its files at [`TensorSpill::finish`], like spilled ones.
    pub fn adopt(&mut self, placed: PlacedFiles) -> Result<()> {
        let PlacedFiles { files, slots, .. } = placed;
        let base = self.adopted.len() + 1;
        for (name, slot) in slots {
            if !slot.written {
                continue;
            }
            if self.entries.iter().any(|(n, _)| *n == name) {
                return Err(TensorError::Write {
                    path: self.path.clone(),
                    name,
                    reason: "a tensor of that name was already written".into(),
                });
            }
            self.entries.push((
                name,
                SpilledTensor {
                    dtype: slot.dtype,
                    shape: slot.shape,
                    file: base + slot.file,
                    offset: slot.offset,
                    len: slot.len,
                },
            ));
        }
        self.adopted
            .extend(files.into_iter().map(|f| (f.temp, f.file)));
        Ok(())
    }
}

/// Tensors written straight to their final place in the safetensors files of a layout known in
/// advance (names, dtypes and shapes of every tensor): a model quantized layer by layer is
/// written once, without a scratch copy. [`PlacedFiles::finish`] gives the files
/// [`save_safetensors_sharded`] writes for the same tensors, byte for byte, once every planned
/// tensor was written; until then the files have temporary names.
pub struct PlacedFiles {
    dir: PathBuf,
    files: Vec<PlacedFile>,
    slots: BTreeMap<String, Slot>,
    /// Total bytes and the weight map, when sharded (an index is written).
    index: Option<(u64, serde_json::Map<String, serde_json::Value>)>,
}

struct PlacedFile {
    temp: PathBuf,
    target: PathBuf,
    file: File,
}

struct Slot {
    dtype: DType,
    shape: Vec<usize>,
    file: usize,
    offset: u64,
    len: u64,
    written: bool,
}

/// A tensor known by its dtype and shape only: the layout of a file to fill later.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSignature {
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl TensorSource for TensorSignature {
    fn dtype(&self) -> DType {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn write_data(&self, _: &mut dyn Write) -> Result<()> {
        Err(TensorError::Write {
            path: PathBuf::from("<layout>"),
            name: "<signature>".into(),
            reason: "a tensor signature holds no data".into(),
        })
    }
}

/// Writes at increasing positions of a file (positioned writes, no shared cursor).
struct PositionedWriter<'a> {
    file: &'a File,
    pos: u64,
}

impl Write for PositionedWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        #[cfg(unix)]
        {
            use std::os::unix::fs::FileExt;
            let n = self.file.write_at(buf, self.pos)?;
            self.pos += n as u64;
            Ok(n)
        }
        #[cfg(not(unix))]
        {
            use std::io::{Seek, SeekFrom};
            let mut f = self.file;
            f.seek(SeekFrom::Start(self.pos))?;
            let n = f.write(buf)?;
            self.pos += n as u64;
            Ok(n)
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl PlacedFiles {
    /// Lay out `plan` in `dir` as [`save_safetensors_sharded`] would (headers written now,
    /// data left to [`PlacedFiles::write`]).
    pub fn create(
        dir: impl AsRef<Path>,
        plan: &[(String, TensorSignature)],
        metadata: Option<&BTreeMap<String, String>>,
        max_shard_bytes: u64,
    ) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let (shards, total) = shard_plan(plan, max_shard_bytes);
        let sharded = !(shards.len() == 1 && total <= max_shard_bytes);
        let n = shards.len();
        let mut files = Vec::with_capacity(n);
        let mut slots = BTreeMap::new();
        let mut weight_map = serde_json::Map::new();
        for (k, shard) in shards.iter().enumerate() {
            let name = if sharded {
                shard_name(k, n)
            } else {
                "model.safetensors".to_string()
            };
            let target = dir.join(&name);
            let temp = dir.join(format!(".{name}.placed"));
            let part: Vec<(String, &TensorSignature)> = shard
                .iter()
                .map(|&i| (plan[i].0.clone(), &plan[i].1))
                .collect();
            let (order, header) = safetensors_header(&part, metadata, &target)?;
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&temp)
                .map_err(|e| TensorError::io(&temp, "creating", e))?;
            let mut offset = header.len() as u64;
            PositionedWriter {
                file: &file,
                pos: 0,
            }
            .write_all(&header)
            .map_err(|e| TensorError::io(&temp, "writing", e))?;
            for i in order {
                let (tname, sig) = &part[i];
                let len = (sig.shape.iter().product::<usize>() * sig.dtype.size_in_bytes()) as u64;
                if slots.contains_key(tname) {
                    return Err(TensorError::Write {
                        path: target.clone(),
                        name: tname.clone(),
                        reason: "a tensor of that name is planned twice".into(),
                    });
                }
                slots.insert(
                    tname.clone(),
                    Slot {
                        dtype: sig.dtype,
                        shape: sig.shape.clone(),
                        file: k,
                        offset,
                        len,
                        written: false,
                    },
                );
                weight_map.insert(tname.clone(), name.clone().into());
                offset += len;
            }
            file.set_len(offset)
                .map_err(|e| TensorError::io(&temp, "sizing", e))?;
            files.push(PlacedFile { temp, target, file });
        }
        Ok(PlacedFiles {
            dir,
            files,
            slots,
            index: sharded.then_some((total, weight_map)),
        })
    }

    /// Whether `name` was planned with this dtype and shape and is not written yet.
    pub fn fits(&self, name: &str, dtype: DType, shape: &[usize]) -> bool {
        self.slots
            .get(name)
            .is_some_and(|s| !s.written && s.dtype == dtype && s.shape == shape)
    }

    /// Write the data of `name` at its place; it must [`fit`](PlacedFiles::fits).
    pub fn write<S: TensorSource>(&mut self, name: &str, tensor: &S) -> Result<()> {
        if !self.fits(name, tensor.dtype(), tensor.shape()) {
            return Err(TensorError::Write {
                path: self.dir.clone(),
                name: name.to_string(),
                reason: "not planned with this dtype and shape, or already written".into(),
            });
        }
        let slot = self.slots.get_mut(name).expect("checked by fits");
        let f = &self.files[slot.file];
        let mut writer = std::io::BufWriter::with_capacity(
            1 << 20,
            PositionedWriter {
                file: &f.file,
                pos: slot.offset,
            },
        );
        let mut counter = CountingWriter {
            inner: &mut writer,
            count: 0,
        };
        tensor.write_data(&mut counter)?;
        let written = counter.count;
        writer
            .flush()
            .map_err(|e| TensorError::io(&f.temp, "writing", e))?;
        if written != slot.len {
            return Err(TensorError::Write {
                path: f.temp.clone(),
                name: name.to_string(),
                reason: format!("wrote {written} bytes into a place of {}", slot.len),
            });
        }
        slot.written = true;
        Ok(())
    }

    /// Whether every planned tensor was written.
    pub fn complete(&self) -> bool {
        self.slots.values().all(|s| s.written)
    }

    /// Give the files their names (and write the index of a sharded layout). Every planned
    /// tensor must have been written. Returns the files written.
    pub fn finish(self) -> Result<Vec<PathBuf>> {
        if let Some((name, _)) = self.slots.iter().find(|(_, s)| !s.written) {
            return Err(TensorError::Write {
                path: self.dir.clone(),
                name: name.clone(),
                reason: "planned but never written".into(),
            });
        }
        let mut written = Vec::with_capacity(self.files.len() + 1);
        for f in self.files {
            f.file
                .sync_all()
                .map_err(|e| TensorError::io(&f.temp, "syncing", e))?;
            drop(f.file);
            std::fs::rename(&f.temp, &f.target)
                .map_err(|e| TensorError::io(&f.target, "renaming", e))?;
            written.push(f.target);
        }
        if let Some((total, weight_map)) = self.index {
            written.push(write_index(&self.dir, total, weight_map)?);
        }
        Ok(written)
    }
}

struct SpillSource<'a> {
    spill: &'a TensorSpill,
    tensor: &'a SpilledTensor,
}

impl TensorSource for SpillSource<'_> {
    fn dtype(&self) -> DType {
        self.tensor.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.tensor.shape
    }
    fn write_data(&self, out: &mut dyn Write) -> Result<()> {
        use std::io::{Read, Seek, SeekFrom};
        let (path, mut file) = match self.tensor.file {
            0 => (&self.spill.path, &self.spill.file),
            i => {
                let (p, f) = &self.spill.adopted[i - 1];
                (p, f)
            }
        };
        let mut buf = vec![0u8; (1 << 22).min(self.tensor.len as usize)];
        let mut done = 0u64;
        while done < self.tensor.len {
            let n = buf.len().min((self.tensor.len - done) as usize);
            file.seek(SeekFrom::Start(self.tensor.offset + done))
                .and_then(|_| file.read_exact(&mut buf[..n]))
                .map_err(|e| TensorError::io(path, "reading back", e))?;
            out.write_all(&buf[..n])
                .map_err(|e| TensorError::io(path, "copying", e))?;
            done += n as u64;
        }
        Ok(())
    }
}

/// Something that can be written as one safetensors tensor. Implemented for [`Tensor`] and
/// [`TensorView`]; implement it to produce tensor data lazily (streamed quantization).
pub trait TensorSource {
    fn dtype(&self) -> DType;
    fn shape(&self) -> &[usize];
    /// Write exactly `numel * dtype size` bytes, row-major.
    fn write_data(&self, out: &mut dyn Write) -> Result<()>;
}

impl TensorSource for TensorView<'_> {
    fn dtype(&self) -> DType {
        TensorView::dtype(self)
    }
    fn shape(&self) -> &[usize] {
        TensorView::shape(self)
    }
    fn write_data(&self, out: &mut dyn Write) -> Result<()> {
        let io = |e| TensorError::io("<safetensors output>", "writing", e);
        if self.is_contiguous() {
            out.write_all(self.contiguous_bytes()?).map_err(io)
        } else {
            out.write_all(self.to_owned()?.view().contiguous_bytes()?)
                .map_err(io)
        }
    }
}

impl TensorSource for Tensor {
    fn dtype(&self) -> DType {
        Tensor::dtype(self)
    }
    fn shape(&self) -> &[usize] {
        Tensor::shape(self)
    }
    fn write_data(&self, out: &mut dyn Write) -> Result<()> {
        self.view().write_data(out)
    }
}

impl<T: TensorSource + ?Sized> TensorSource for &T {
    fn dtype(&self) -> DType {
        (**self).dtype()
    }
    fn shape(&self) -> &[usize] {
        (**self).shape()
    }
    fn write_data(&self, out: &mut dyn Write) -> Result<()> {
        (**self).write_data(out)
    }
}

struct CountingWriter<'a> {
    inner: &'a mut dyn Write,
    count: u64,
}

impl Write for CountingWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Write `tensors` in safetensors format to any writer. Tensors are ordered by dtype size
/// (largest first) then name, so every tensor stays aligned to its element size.
pub fn write_safetensors<S: TensorSource>(
    out: &mut dyn Write,
    tensors: &[(String, S)],
    metadata: Option<&BTreeMap<String, String>>,
    path_for_errors: &Path,
) -> Result<()> {
    let (order, header) = safetensors_header(tensors, metadata, path_for_errors)?;
    let io = |e| TensorError::io(path_for_errors, "writing", e);
    out.write_all(&header).map_err(io)?;
    for &i in &order {
        let (name, t) = &tensors[i];
        let expected = (t.shape().iter().product::<usize>() * t.dtype().size_in_bytes()) as u64;
        let mut counter = CountingWriter {
            inner: out,
            count: 0,
        };
        t.write_data(&mut counter).map_err(|e| TensorError::Write {
            path: path_for_errors.to_path_buf(),
            name: name.clone(),
            reason: e.to_string(),
        })?;
        if counter.count != expected {
            return Err(TensorError::Write {
                path: path_for_errors.to_path_buf(),
                name: name.clone(),
                reason: format!(
                    "wrote {} bytes for shape {:?} of {}, expected {expected}",
                    counter.count,
                    t.shape(),
                    t.dtype()
                ),
            });
        }
    }
    Ok(())
}

/// The order of `tensors` in a safetensors file and the bytes before their data (the header
/// length, then the padded JSON header): what [`write_safetensors`] writes first.
fn safetensors_header<S: TensorSource>(
    tensors: &[(String, S)],
    metadata: Option<&BTreeMap<String, String>>,
    path_for_errors: &Path,
) -> Result<(Vec<usize>, Vec<u8>)> {
    let order = file_order(tensors);
    let mut infos = Vec::with_capacity(tensors.len());
    let mut offset = 0usize;
    for &i in &order {
        let (name, t) = &tensors[i];
        let len = checked_numel(t.shape())
            .and_then(|n| n.checked_mul(t.dtype().size_in_bytes()))
            .ok_or_else(|| TensorError::ShapeOverflow {
                shape: t.shape().to_vec(),
            })?;
        infos.push((
            name.clone(),
            TensorInfo {
                dtype: t.dtype().to_safetensors(),
                shape: t.shape().to_vec(),
                data_offsets: (offset, offset + len),
            },
        ));
        offset += len;
    }
    let user = metadata.map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect());
    let header_error = |reason: String| TensorError::Write {
        path: path_for_errors.to_path_buf(),
        name: "<header>".into(),
        reason,
    };
    // The reference crate validates the layout; the header itself is written from a sorted map,
    // because its `__metadata__` is a HashMap and the same inputs must give the same bytes.
    Metadata::new(user, infos.clone()).map_err(|e| header_error(e.to_string()))?;
    let mut map = serde_json::Map::new();
    if let Some(m) = metadata {
        map.insert(
            "__metadata__".into(),
            serde_json::to_value(m).map_err(|e| header_error(e.to_string()))?,
        );
    }
    for (name, info) in &infos {
        map.insert(
            name.clone(),
            serde_json::json!({
                "dtype": info.dtype,
                "shape": info.shape,
                "data_offsets": [info.data_offsets.0, info.data_offsets.1],
            }),
        );
    }
    let mut header = serde_json::to_vec(&map).map_err(|e| header_error(e.to_string()))?;
    header.resize(header.len().next_multiple_of(8), b' ');
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&header);
    Ok((order, bytes))
}

/// The order tensors take in a file: dtype size (largest first), then name.
fn file_order<S: TensorSource>(tensors: &[(String, S)]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by(|&a, &b| {
        let (na, ta) = &tensors[a];
        let (nb, tb) = &tensors[b];
        tb.dtype()
            .size_in_bytes()
            .cmp(&ta.dtype().size_in_bytes())
            .then_with(|| na.cmp(nb))
    });
    order
}

/// Save `tensors` into the directory `dir` as Hugging Face does: `model.safetensors` when they
/// take at most `max_shard_bytes`, otherwise shards `model-00001-of-0000N.safetensors` of at
/// most that size each (a larger tensor gets a shard of its own), cut in file order, and
/// `model.safetensors.index.json` mapping each tensor to its shard. Each file is written
/// atomically; write into a temporary directory for the set to appear at once. Returns the
/// files written.
pub fn save_safetensors_sharded<S: TensorSource>(
    dir: impl AsRef<Path>,
    tensors: &[(String, S)],
    metadata: Option<&BTreeMap<String, String>>,
    max_shard_bytes: u64,
) -> Result<Vec<PathBuf>> {
    let dir = dir.as_ref();
    let (shards, total) = shard_plan(tensors, max_shard_bytes);
    if shards.len() == 1 && total <= max_shard_bytes {
        let path = dir.join("model.safetensors");
        save_safetensors(&path, tensors, metadata)?;
        return Ok(vec![path]);
    }
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    let mut written = Vec::with_capacity(n + 1);
    for (k, shard) in shards.iter().enumerate() {
        let file = shard_name(k, n);
        let part: Vec<(String, &S)> = shard
            .iter()
            .map(|&i| (tensors[i].0.clone(), &tensors[i].1))
            .collect();
        let path = dir.join(&file);
        save_safetensors(&path, &part, metadata)?;
        for (name, _) in &part {
            weight_map.insert(name.clone(), file.clone().into());
        }
        written.push(path);
    }
    written.push(write_index(dir, total, weight_map)?);
    Ok(written)
}

/// How [`save_safetensors_sharded`] cuts `tensors` into files (indices into `tensors`, in file
/// order), and their total bytes. One part holding everything within `max_shard_bytes` is
/// written as `model.safetensors` without an index.
fn shard_plan<S: TensorSource>(
    tensors: &[(String, S)],
    max_shard_bytes: u64,
) -> (Vec<Vec<usize>>, u64) {
    let bytes = |t: &S| (t.shape().iter().product::<usize>() * t.dtype().size_in_bytes()) as u64;
    let total: u64 = tensors.iter().map(|(_, t)| bytes(t)).sum();
    if total <= max_shard_bytes {
        return (vec![file_order(tensors)], total);
    }
    let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
    let mut size = 0u64;
    for i in file_order(tensors) {
        let b = bytes(&tensors[i].1);
        if size + b > max_shard_bytes && shards.last().is_some_and(|s| !s.is_empty()) {
            shards.push(Vec::new());
            size = 0;
        }
        size += b;
        shards.last_mut().expect("one shard at least").push(i);
    }
    (shards, total)
}

fn shard_name(k: usize, n: usize) -> String {
    format!("model-{:05}-of-{n:05}.safetensors", k + 1)
}

/// `model.safetensors.index.json` of a sharded checkpoint.
fn write_index(
    dir: &Path,
    total: u64,
    weight_map: serde_json::Map<String, serde_json::Value>,
) -> Result<PathBuf> {
    let index = serde_json::json!({
        "metadata": {"total_size": total},
        "weight_map": weight_map,
    });
    let path = dir.join("model.safetensors.index.json");
    let text = serde_json::to_string_pretty(&index).map_err(|e| TensorError::Write {
        path: path.clone(),
        name: "<index>".into(),
        reason: e.to_string(),
    })?;
    crate::atomic::write_atomic(&path, |w| {
        w.write_all(text.as_bytes())
            .map_err(|e| TensorError::io(&path, "writing", e))
    })?;
    Ok(path)
}

/// Save `tensors` to `path` atomically: a temporary file beside it, fsync, rename. On any
/// error nothing appears at `path` and a previous file there is left intact.
pub fn save_safetensors<S: TensorSource>(
    path: impl AsRef<Path>,
    tensors: &[(String, S)],
    metadata: Option<&BTreeMap<String, String>>,
) -> Result<()> {
    let path = path.as_ref();
    let mut file = AtomicFile::create(path)?;
    write_safetensors(file.writer(), tensors, metadata, path)?;
    file.commit()
}

#[cfg(test)]
mod tests {
    //! Pure header checks on in-memory bytes (no file, no map), so they also run under Miri:
    //! `cargo +nightly miri test -p sq-tensor --lib safetensors`.
    use super::*;

    fn file(header: &str, data: usize) -> Vec<u8> {
        let mut b = (header.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(header.as_bytes());
        b.resize(b.len() + data, 7);
        b
    }

    const OK: &str = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"I8","shape":[2,2],"data_offsets":[8,12]}}"#;

    #[test]
    fn header_checks_on_bytes() {
        let p = Path::new("t.safetensors");
        let good = file(OK, 12);
        assert_eq!(diagnose_header(p, &good).unwrap(), OK.len());
        // Every truncation is an error (or, cut inside the 8-byte prefix, never read).
        for cut in 8..good.len() {
            assert!(diagnose_header(p, &good[..cut]).is_err(), "cut at {cut}");
        }
        for bad in [
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"I8","shape":[2,2],"data_offsets":[4,8]}}"#,
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}}"#,
            r#"{"a":{"dtype":"F32","shape":[18446744073709551615,4],"data_offsets":[0,8]}}"#,
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,18446744073709551615]}}"#,
            r#"{"a":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}}"#,
            r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
            r#"{"a":{"dtype":"F32","shape":"x","data_offsets":[0,8]}}"#,
            r#"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]"#,
            "{\"a\":1",
        ] {
            assert!(diagnose_header(p, &file(bad, 12)).is_err(), "{bad}");
        }
        // Header lengths past the end or the limit.
        for n in [u64::MAX, MAX_HEADER_BYTES + 1, good.len() as u64] {
            let mut b = good.clone();
            b[..8].copy_from_slice(&n.to_le_bytes());
            assert!(diagnose_header(p, &b).is_err(), "{n}");
        }
    }
}
