//! GGUF (llama.cpp) files: a validating reader ([`GgufFile`]) and a loader for LLaMA models
//! ([`load_gguf`]) that dequantizes F32, F16, BF16, Q8_0, Q4_0 and Q4_1 tensors to f32 under
//! Hugging Face names.
//!
//! Layout (versions 2 and 3, little-endian): magic `GGUF`, u32 version, u64 tensor count, u64
//! metadata count, the metadata key/value pairs, the tensor infos (name, u32 rank, u64 dims
//! innermost first, u32 GGML type, u64 offset into the data section), padding to
//! `general.alignment` (default 32), then the data section.
//!
//! Every count, length, rank, dimension and offset is checked against the real file size before
//! it is used, and tensor byte ranges must be aligned, in bounds and disjoint.

use crate::error::{ModelError, Result};
use crate::raw::{
    f32_to_f64_decimal, finite_tensor, hf_layer_tensor_names, unpermute_interleaved_rope,
    LlamaHyperParams, RawModel,
};
use half::{bf16, f16};
use rayon::prelude::*;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

/// The four bytes every GGUF file starts with.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Data alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most four dimensions.
pub const MAX_DIMS: usize = 4;
/// Arrays of arrays deeper than this are rejected (they only serve to exhaust the stack).
const MAX_ARRAY_NESTING: usize = 8;
/// Memory the parsed metadata may take. A one-byte array element in the file becomes a
/// [`GgufValue`] of 32 bytes, so a count that fits the file can still ask for 32 times its
/// size; 256 MiB holds vocabularies many times larger than any published model's.
const MAX_METADATA_MEMORY: usize = 256 << 20;

/// A GGML tensor type id, with the names and block layouts of the types ggml defines.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GgmlType(pub u32);

impl GgmlType {
    /// 32-bit float.
    pub const F32: GgmlType = GgmlType(0);
    /// IEEE half.
    pub const F16: GgmlType = GgmlType(1);
    /// 4-bit, symmetric: blocks of 32 values, an f16 scale and 16 bytes of nibbles.
    pub const Q4_0: GgmlType = GgmlType(2);
    /// 4-bit with offset: blocks of 32 values, f16 scale, f16 minimum, 16 bytes of nibbles.
    pub const Q4_1: GgmlType = GgmlType(3);
    /// 8-bit, symmetric: blocks of 32 values, an f16 scale and 32 i8.
    pub const Q8_0: GgmlType = GgmlType(8);
    /// bfloat16.
    pub const BF16: GgmlType = GgmlType(30);

    /// The ggml name of the type (`"Q4_K"`), if the id is one ggml defines.
    pub fn name(self) -> Option<&'static str> {
        self.info().map(|(name, _, _)| name)
    }

    /// `(values per block, bytes per block)`, if the id is one ggml defines.
    pub fn block_layout(self) -> Option<(usize, usize)> {
        self.info().map(|(_, values, bytes)| (values, bytes))
    }

    /// Whether [`dequantize`] supports the type.
    pub fn is_supported(self) -> bool {
        matches!(
            self,
            Self::F32 | Self::F16 | Self::BF16 | Self::Q8_0 | Self::Q4_0 | Self::Q4_1
        )
    }

    fn info(self) -> Option<(&'static str, usize, usize)> {
        // From ggml's type traits; ids 4, 5, 31-33 and 36-38 were removed from ggml.
        Some(match self.0 {
            0 => ("F32", 1, 4),
            1 => ("F16", 1, 2),
            2 => ("Q4_0", 32, 18),
            3 => ("Q4_1", 32, 20),
            6 => ("Q5_0", 32, 22),
            7 => ("Q5_1", 32, 24),
            8 => ("Q8_0", 32, 34),
            9 => ("Q8_1", 32, 36),
            10 => ("Q2_K", 256, 84),
            11 => ("Q3_K", 256, 110),
            12 => ("Q4_K", 256, 144),
            13 => ("Q5_K", 256, 176),
            14 => ("Q6_K", 256, 210),
            15 => ("Q8_K", 256, 292),
            16 => ("IQ2_XXS", 256, 66),
            17 => ("IQ2_XS", 256, 74),
            18 => ("IQ3_XXS", 256, 98),
            19 => ("IQ1_S", 256, 50),
            20 => ("IQ4_NL", 32, 18),
            21 => ("IQ3_S", 256, 110),
            22 => ("IQ2_S", 256, 82),
            23 => ("IQ4_XS", 256, 136),
            24 => ("I8", 1, 1),
            25 => ("I16", 1, 2),
            26 => ("I32", 1, 4),
            27 => ("I64", 1, 8),
            28 => ("F64", 1, 8),
            29 => ("IQ1_M", 256, 56),
            30 => ("BF16", 1, 2),
            34 => ("TQ1_0", 256, 54),
            35 => ("TQ2_0", 256, 66),
            39 => ("MXFP4", 32, 17),
            _ => return None,
        })
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => f.write_str(name),
            None => write!(f, "unknown type id {}", self.0),
        }
    }
}

impl fmt::Debug for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GgmlType({}: {self})", self.0)
    }
}

/// The type of a metadata value, as stored in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgufValueType {
    /// u8 (id 0).
    U8,
    /// i8 (id 1).
    I8,
    /// u16 (id 2).
    U16,
    /// i16 (id 3).
    I16,
    /// u32 (id 4).
    U32,
    /// i32 (id 5).
    I32,
    /// f32 (id 6).
    F32,
    /// bool stored as one byte, 0 or 1 (id 7).
    Bool,
    /// UTF-8 string with a u64 length (id 8).
    String,
    /// Array: u32 element type, u64 count, elements (id 9).
    Array,
    /// u64 (id 10).
    U64,
    /// i64 (id 11).
    I64,
    /// f64 (id 12).
    F64,
}

impl GgufValueType {
    fn from_id(id: u32) -> Option<Self> {
        use GgufValueType::*;
        Some(match id {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    /// The fewest bytes one value of this type occupies (strings and arrays: their headers).
    fn min_size(self) -> usize {
        use GgufValueType::*;
        match self {
            U8 | I8 | Bool => 1,
            U16 | I16 => 2,
            U32 | I32 | F32 => 4,
            U64 | I64 | F64 | String => 8,
            Array => 12,
        }
    }
}

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    /// u8.
    U8(u8),
    /// i8.
    I8(i8),
    /// u16.
    U16(u16),
    /// i16.
    I16(i16),
    /// u32.
    U32(u32),
    /// i32.
    I32(i32),
    /// f32.
    F32(f32),
    /// bool.
    Bool(bool),
    /// UTF-8 string.
    String(String),
    /// Homogeneous array.
    Array {
        /// Type of every element.
        elem_type: GgufValueType,
        /// The elements.
        values: Vec<GgufValue>,
    },
    /// u64.
    U64(u64),
    /// i64.
    I64(i64),
    /// f64.
    F64(f64),
}

impl GgufValue {
    /// The stored type.
    pub fn value_type(&self) -> GgufValueType {
        match self {
            GgufValue::U8(_) => GgufValueType::U8,
            GgufValue::I8(_) => GgufValueType::I8,
            GgufValue::U16(_) => GgufValueType::U16,
            GgufValue::I16(_) => GgufValueType::I16,
            GgufValue::U32(_) => GgufValueType::U32,
            GgufValue::I32(_) => GgufValueType::I32,
            GgufValue::F32(_) => GgufValueType::F32,
            GgufValue::Bool(_) => GgufValueType::Bool,
            GgufValue::String(_) => GgufValueType::String,
            GgufValue::Array { .. } => GgufValueType::Array,
            GgufValue::U64(_) => GgufValueType::U64,
            GgufValue::I64(_) => GgufValueType::I64,
            GgufValue::F64(_) => GgufValueType::F64,
        }
    }

    /// Any integer value that is non-negative, as u64.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v.into()),
            GgufValue::U16(v) => Some(v.into()),
            GgufValue::U32(v) => Some(v.into()),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer value, as i64 (u64 values above `i64::MAX` give `None`).
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            GgufValue::I8(v) => Some(v.into()),
            GgufValue::I16(v) => Some(v.into()),
            GgufValue::I32(v) => Some(v.into()),
            GgufValue::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// A float value as f64; f32 values keep their shortest decimal form (`1e-5`, not
    /// `9.99999974e-6`).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(f32_to_f64_decimal(v)),
            GgufValue::F64(v) => Some(v),
            _ => None,
        }
    }

    /// A bool value.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(v) => Some(v),
            _ => None,
        }
    }

    /// A string value.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// An array's elements.
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array { values, .. } => Some(values),
            _ => None,
        }
    }

    /// A short human-readable rendering (arrays summarised), for `inspect`-style listings.
    pub fn summary(&self) -> String {
        match self {
            GgufValue::String(s) if s.chars().count() > 80 => {
                let head: String = s.chars().take(77).collect();
                format!("{head:?}...")
            }
            GgufValue::String(s) => format!("{s:?}"),
            GgufValue::Array { elem_type, values } => {
                let shown: Vec<String> = values.iter().take(4).map(|v| v.summary()).collect();
                let more = if values.len() > 4 { ", ..." } else { "" };
                format!(
                    "[{elem_type:?}; {}] [{}{more}]",
                    values.len(),
                    shown.join(", ")
                )
            }
            GgufValue::U8(v) => v.to_string(),
            GgufValue::I8(v) => v.to_string(),
            GgufValue::U16(v) => v.to_string(),
            GgufValue::I16(v) => v.to_string(),
            GgufValue::U32(v) => v.to_string(),
            GgufValue::I32(v) => v.to_string(),
            GgufValue::U64(v) => v.to_string(),
            GgufValue::I64(v) => v.to_string(),
            GgufValue::F32(v) => v.to_string(),
            GgufValue::F64(v) => v.to_string(),
            GgufValue::Bool(v) => v.to_string(),
        }
    }
}

/// Where one tensor lives in the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GgufTensorInfo {
    /// llama.cpp name (`blk.0.attn_q.weight`).
    pub name: String,
    /// Dimensions as stored, innermost first (ggml's `ne`).
    pub dims: Vec<u64>,
    /// Element type.
    pub ggml_type: GgmlType,
    /// Offset of the data, relative to the start of the data section.
    pub offset: u64,
    /// Size of the data in bytes.
    pub n_bytes: u64,
}

impl GgufTensorInfo {
    /// Shape in PyTorch order (outermost first): the dims reversed.
    pub fn shape(&self) -> Vec<usize> {
        // Open() checked that every dim and the element count fit in usize.
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.dims.iter().map(|&d| d as usize).product()
    }
}

enum Bytes {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Bytes {
    fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

/// A validated GGUF file: its metadata and tensor infos, over a memory map (or owned bytes).
pub struct GgufFile {
    path: PathBuf,
    bytes: Bytes,
    version: u32,
    metadata: Vec<(String, GgufValue)>,
    metadata_index: HashMap<String, usize>,
    tensors: Vec<GgufTensorInfo>,
    tensor_index: HashMap<String, usize>,
    alignment: u64,
    data_offset: u64,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .field("alignment", &self.alignment)
            .field("data_offset", &self.data_offset)
            .finish()
    }
}

/// A bounds-checked little-endian reader over the header.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
    /// Bytes of metadata memory still allowed ([`MAX_METADATA_MEMORY`]).
    budget: usize,
}

impl<'a> Cursor<'a> {
    fn err(&self, reason: String) -> ModelError {
        ModelError::Gguf {
            path: self.path.to_path_buf(),
            reason,
        }
    }

    fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    /// Charge `bytes` of parsed-metadata memory, failing once the budget is spent.
    fn charge(&mut self, bytes: usize, what: &dyn Fn() -> String) -> Result<()> {
        match self.budget.checked_sub(bytes) {
            Some(left) => {
                self.budget = left;
                Ok(())
            }
            None => Err(self.err(format!(
                "{} at offset {} takes the metadata past {} MiB of memory",
                what(),
                self.pos,
                MAX_METADATA_MEMORY >> 20
            ))),
        }
    }

    fn take(&mut self, n: usize, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        match end {
            Some(end) => {
                let s = &self.buf[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(self.err(format!(
                "truncated: {} needs {n} bytes at offset {}, but the file has {} bytes",
                what(),
                self.pos,
                self.buf.len()
            ))),
        }
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N]> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count of items that each take at least `min_item` bytes, checked against what is left.
    fn count(&mut self, min_item: usize, what: &dyn Fn() -> String) -> Result<usize> {
        let n = self.u64(what)?;
        let fits = usize::try_from(n)
            .ok()
            .and_then(|n| n.checked_mul(min_item))
            .is_some_and(|bytes| bytes <= self.remaining());
        if !fits {
            return Err(self.err(format!(
                "{} is {n}, but only {} bytes remain after offset {} (each item needs at least {min_item})",
                what(),
                self.remaining(),
                self.pos
            )));
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        let len = self.count(1, &|| format!("length of {}", what()))?;
        self.charge(len, what)?;
        let start = self.pos;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|e| self.err(format!("{} at offset {start} is not UTF-8: {e}", what())))
    }

    fn value(
        &mut self,
        ty: GgufValueType,
        depth: usize,
        what: &dyn Fn() -> String,
    ) -> Result<GgufValue> {
        use GgufValueType as T;
        Ok(match ty {
            T::U8 => GgufValue::U8(u8::from_le_bytes(self.array(what)?)),
            T::I8 => GgufValue::I8(i8::from_le_bytes(self.array(what)?)),
            T::U16 => GgufValue::U16(u16::from_le_bytes(self.array(what)?)),
            T::I16 => GgufValue::I16(i16::from_le_bytes(self.array(what)?)),
            T::U32 => GgufValue::U32(self.u32(what)?),
            T::I32 => GgufValue::I32(i32::from_le_bytes(self.array(what)?)),
            T::F32 => GgufValue::F32(f32::from_le_bytes(self.array(what)?)),
            T::U64 => GgufValue::U64(self.u64(what)?),
            T::I64 => GgufValue::I64(i64::from_le_bytes(self.array(what)?)),
            T::F64 => GgufValue::F64(f64::from_le_bytes(self.array(what)?)),
            T::Bool => {
                let at = self.pos;
                match self.array::<1>(what)?[0] {
                    0 => GgufValue::Bool(false),
                    1 => GgufValue::Bool(true),
                    b => {
                        return Err(self.err(format!(
                            "{} at offset {at} is a bool with byte value {b} (must be 0 or 1)",
                            what()
                        )))
                    }
                }
            }
            T::String => GgufValue::String(self.string(what)?),
            T::Array => {
                if depth >= MAX_ARRAY_NESTING {
                    return Err(self.err(format!(
                        "{} nests arrays more than {MAX_ARRAY_NESTING} deep",
                        what()
                    )));
                }
                let at = self.pos;
                let type_id = self.u32(&|| format!("element type of {}", what()))?;
                let elem_type = GgufValueType::from_id(type_id).ok_or_else(|| {
                    self.err(format!(
                        "{} at offset {at} has unknown element type id {type_id}",
                        what()
                    ))
                })?;
                let n = self.count(elem_type.min_size(), &|| {
                    format!("element count of {}", what())
                })?;
                self.charge(n.saturating_mul(std::mem::size_of::<GgufValue>()), what)?;
                let mut values = Vec::with_capacity(n);
                for i in 0..n {
                    values.push(self.value(elem_type, depth + 1, &|| {
                        format!("element {i} of {}", what())
                    })?);
                }
                GgufValue::Array { elem_type, values }
            }
        })
    }
}

impl GgufFile {
    /// Memory-maps and validates a GGUF file.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile> {
        let path = path.as_ref();
        let file =
            std::fs::File::open(path).map_err(|e| ModelError::io(path, "opening GGUF file", e))?;
        // SAFETY: the map is read-only; like every memory-mapped model loader we rely on the
        // file not being truncated or rewritten while it is open.
        let mmap = unsafe { memmap2::Mmap::map(&file) }
            .map_err(|e| ModelError::io(path, "memory-mapping GGUF file", e))?;
        Self::parse(path.to_path_buf(), Bytes::Mapped(mmap))
    }

    /// Validates a GGUF image held in memory; `source` names it in errors.
    pub fn from_bytes(bytes: Vec<u8>, source: impl Into<PathBuf>) -> Result<GgufFile> {
        Self::parse(source.into(), Bytes::Owned(bytes))
    }

    fn parse(path: PathBuf, bytes: Bytes) -> Result<GgufFile> {
        let buf = bytes.as_slice();
        let mut c = Cursor {
            buf,
            pos: 0,
            path: &path,
            budget: MAX_METADATA_MEMORY,
        };
        let magic: [u8; 4] = c.array(&|| "the magic".to_string())?;
        if magic != GGUF_MAGIC {
            return Err(c.err(format!(
                "bad magic {magic:02x?} (expected \"GGUF\" = {GGUF_MAGIC:02x?})"
            )));
        }
        let version = c.u32(&|| "the version".to_string())?;
        match version {
            2 | 3 => {}
            1 => {
                return Err(c.err(
                    "version 1 (32-bit counts) is not supported; versions 2 and 3 are".to_string(),
                ))
            }
            v if v.swap_bytes() == 2 || v.swap_bytes() == 3 => {
                return Err(c.err(format!(
                    "big-endian GGUF (version {}) is not supported",
                    v.swap_bytes()
                )))
            }
            v => return Err(c.err(format!("unsupported version {v} (supported: 2 and 3)"))),
        }
        // Minimum tensor info: empty name (8) + rank (4) + type (4) + offset (8).
        let n_tensors = c.count(24, &|| "the tensor count".to_string())?;
        // Minimum key/value: empty key (8) + type (4) + one-byte value.
        let n_kv = c.count(13, &|| "the metadata count".to_string())?;

        // Capacities grow as entries really parse: a count only bounds them by the file size,
        // and an entry takes several times its file size in memory.
        let mut metadata = Vec::with_capacity(n_kv.min(1024));
        let mut metadata_index = HashMap::with_capacity(n_kv.min(1024));
        for i in 0..n_kv {
            let key = c.string(&|| format!("key of metadata entry {i}"))?;
            let at = c.pos;
            let type_id = c.u32(&|| format!("type of metadata `{key}`"))?;
            let ty = GgufValueType::from_id(type_id).ok_or_else(|| {
                c.err(format!(
                    "metadata `{key}` at offset {at} has unknown value type id {type_id}"
                ))
            })?;
            let value = c.value(ty, 0, &|| format!("metadata `{key}`"))?;
            if metadata_index.insert(key.clone(), metadata.len()).is_some() {
                return Err(c.err(format!("duplicate metadata key `{key}`")));
            }
            metadata.push((key, value));
        }

        let alignment = match metadata_index.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(&i) => match &metadata[i].1 {
                GgufValue::U32(a) if a.is_power_of_two() => u64::from(*a),
                other => {
                    return Err(c.err(format!(
                        "general.alignment must be a u32 power of two, found {other:?}"
                    )))
                }
            },
        };

        let mut tensors = Vec::with_capacity(n_tensors.min(4096));
        let mut tensor_index = HashMap::with_capacity(n_tensors.min(4096));
        for i in 0..n_tensors {
            let name = c.string(&|| format!("name of tensor {i}"))?;
            let n_dims = c.u32(&|| format!("rank of tensor `{name}`"))?;
            if n_dims as usize > MAX_DIMS {
                return Err(c.err(format!(
                    "tensor `{name}` has {n_dims} dimensions (at most {MAX_DIMS})"
                )));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for d in 0..n_dims {
                dims.push(c.u64(&|| format!("dimension {d} of tensor `{name}`"))?);
            }
            let ggml_type = GgmlType(c.u32(&|| format!("type of tensor `{name}`"))?);
            let offset = c.u64(&|| format!("offset of tensor `{name}`"))?;
            let n_bytes = tensor_byte_size(&c, &name, &dims, ggml_type)?;
            if offset % alignment != 0 {
                return Err(c.err(format!(
                    "tensor `{name}` has offset {offset}, not a multiple of the alignment {alignment}"
                )));
            }
            if tensor_index.insert(name.clone(), tensors.len()).is_some() {
                return Err(c.err(format!("duplicate tensor name `{name}`")));
            }
            tensors.push(GgufTensorInfo {
                name,
                dims,
                ggml_type,
                offset,
                n_bytes,
            });
        }

        let file_len = buf.len() as u64;
        let header_end = c.pos as u64;
        let data_offset = header_end
            .checked_next_multiple_of(alignment)
            .ok_or_else(|| c.err("data section offset overflows".to_string()))?;
        // A file without tensors may end right after its header.
        if !tensors.is_empty() && data_offset > file_len {
            return Err(c.err(format!(
                "truncated: the data section starts at offset {data_offset}, but the file has {file_len} bytes"
            )));
        }
        let data_len = file_len.saturating_sub(data_offset);
        let mut order: Vec<usize> = (0..tensors.len()).collect();
        order.sort_by_key(|&i| (tensors[i].offset, tensors[i].n_bytes));
        let mut prev: Option<(&str, u64)> = None;
        for &i in &order {
            let t = &tensors[i];
            let end = t.offset.checked_add(t.n_bytes);
            if end.is_none_or(|e| e > data_len) {
                return Err(c.err(format!(
                    "tensor `{}` ({} {:?}, {} bytes at data offset {}) extends past the end of the data section ({data_len} bytes from file offset {data_offset})",
                    t.name, t.ggml_type, t.dims, t.n_bytes, t.offset
                )));
            }
            if let Some((prev_name, prev_end)) = prev {
                if t.offset < prev_end {
                    return Err(c.err(format!(
                        "tensor `{}` (data offset {}) overlaps tensor `{prev_name}` (which ends at {prev_end})",
                        t.name, t.offset
                    )));
                }
            }
            prev = Some((&t.name, t.offset + t.n_bytes));
        }

        Ok(GgufFile {
            version,
            metadata,
            metadata_index,
            tensors,
            tensor_index,
            alignment,
            data_offset,
            path,
            bytes,
        })
    }

    /// The file's path (or the `source` given to [`GgufFile::from_bytes`]).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Metadata in file order.
    pub fn metadata(&self) -> &[(String, GgufValue)] {
        &self.metadata
    }

    /// One metadata value.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata_index.get(key).map(|&i| &self.metadata[i].1)
    }

    /// `general.architecture`, if present and a string.
    pub fn architecture(&self) -> Option<&str> {
        self.get("general.architecture").and_then(GgufValue::as_str)
    }

    /// Tensor infos in file order.
    pub fn tensors(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }

    /// One tensor's info.
    pub fn tensor_info(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// Data alignment (`general.alignment` or 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// File offset of the data section.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// The raw bytes of a tensor (`info` from [`GgufFile::tensors`]; any other info is checked
    /// against the file).
    pub fn tensor_bytes(&self, info: &GgufTensorInfo) -> Result<&[u8]> {
        let range = self
            .data_offset
            .checked_add(info.offset)
            .and_then(|start| Some((start, start.checked_add(info.n_bytes)?)))
            .and_then(|(s, e)| Some(usize::try_from(s).ok()?..usize::try_from(e).ok()?));
        range
            .and_then(|r| self.bytes.as_slice().get(r))
            .ok_or_else(|| {
                self.err(format!(
                    "tensor `{}` ({} bytes at data offset {}) is outside the file",
                    info.name, info.n_bytes, info.offset
                ))
            })
    }

    /// A tensor dequantized to f32 in PyTorch shape (dims reversed), NaN/Inf rejected.
    pub fn tensor_f32(&self, name: &str) -> Result<sq_tensor::Tensor> {
        let info = self
            .tensor_info(name)
            .ok_or_else(|| ModelError::MissingTensor {
                path: self.path.clone(),
                name: name.to_string(),
            })?;
        let data = self.dequantize_info(info)?;
        finite_tensor(&self.path, name, data, &info.shape())
    }

    fn dequantize_info(&self, info: &GgufTensorInfo) -> Result<Vec<f32>> {
        if !info.ggml_type.is_supported() {
            return Err(self.unsupported(info));
        }
        dequantize(info.ggml_type, self.tensor_bytes(info)?).map_err(|e| ModelError::Gguf {
            path: self.path.clone(),
            reason: format!("tensor `{}`: {e}", info.name),
        })
    }

    fn unsupported(&self, info: &GgufTensorInfo) -> ModelError {
        ModelError::UnsupportedGgufType {
            path: self.path.clone(),
            name: info.name.clone(),
            ggml_type: info.ggml_type.to_string(),
        }
    }

    fn err(&self, reason: String) -> ModelError {
        ModelError::Gguf {
            path: self.path.clone(),
            reason,
        }
    }

    fn config_err(&self, reason: String) -> ModelError {
        ModelError::Config {
            path: self.path.clone(),
            reason,
        }
    }

    /// A required non-negative integer metadata value that fits in usize.
    pub(crate) fn meta_usize(&self, key: &str) -> Result<usize> {
        self.opt_meta_usize(key)?
            .ok_or_else(|| self.config_err(format!("metadata `{key}` is missing")))
    }

    pub(crate) fn opt_meta_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|v| usize::try_from(v).ok())
                .map(Some)
                .ok_or_else(|| {
                    self.config_err(format!(
                        "metadata `{key}` must be a non-negative integer, found {}",
                        v.summary()
                    ))
                }),
        }
    }

    fn opt_meta_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| {
                self.config_err(format!(
                    "metadata `{key}` must be a float, found {}",
                    v.summary()
                ))
            }),
        }
    }

    fn opt_meta_str(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_str().map(Some).ok_or_else(|| {
                self.config_err(format!(
                    "metadata `{key}` must be a string, found {}",
                    v.summary()
                ))
            }),
        }
    }
}

/// Bytes of a tensor with `dims` of `ty`, with every product checked.
fn tensor_byte_size(c: &Cursor<'_>, name: &str, dims: &[u64], ty: GgmlType) -> Result<u64> {
    let (block_values, block_bytes) =
        ty.block_layout()
            .ok_or_else(|| ModelError::UnsupportedGgufType {
                path: c.path.to_path_buf(),
                name: name.to_string(),
                ggml_type: ty.to_string(),
            })?;
    let mut numel: u64 = 1;
    for &d in dims {
        if d == 0 {
            return Err(c.err(format!("tensor `{name}` has a zero dimension in {dims:?}")));
        }
        numel = numel
            .checked_mul(d)
            .filter(|&n| usize::try_from(n).is_ok())
            .ok_or_else(|| c.err(format!("tensor `{name}` dimensions {dims:?} overflow")))?;
    }
    let ne0 = dims.first().copied().unwrap_or(1);
    if ne0 % block_values as u64 != 0 {
        return Err(c.err(format!(
            "tensor `{name}` of type {ty} has innermost dimension {ne0}, not a multiple of its block size {block_values}"
        )));
    }
    (numel / block_values as u64)
        .checked_mul(block_bytes as u64)
        .ok_or_else(|| c.err(format!("tensor `{name}` byte size overflows")))
}

/// Dequantizes `data` of GGML type `ty` (F32, F16, BF16, Q8_0, Q4_0 or Q4_1) to f32.
/// Values come out in storage order (innermost dimension fastest). Fails when the type is not
/// one of those or `data` is not a whole number of blocks.
pub fn dequantize(ty: GgmlType, data: &[u8]) -> Result<Vec<f32>> {
    let (values, bytes) = match ty.block_layout() {
        Some(layout) if ty.is_supported() => layout,
        _ => {
            return Err(ModelError::Invalid(format!(
                "dequantize: GGML type {ty} is not supported (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1)"
            )))
        }
    };
    if !data.len().is_multiple_of(bytes) {
        return Err(ModelError::Invalid(format!(
            "dequantize: {} bytes of {ty} is not a whole number of {bytes}-byte blocks",
            data.len()
        )));
    }
    let n_blocks = data.len() / bytes;
    let mut out = vec![0f32; n_blocks * values];
    // Work units of whole blocks, large enough to amortise rayon's scheduling.
    let blocks_per_job = (65536 / values).max(1);
    out.par_chunks_mut(blocks_per_job * values)
        .zip(data.par_chunks(blocks_per_job * bytes))
        .for_each(|(dst, src)| {
            for (d, s) in dst.chunks_exact_mut(values).zip(src.chunks_exact(bytes)) {
                dequantize_block(ty, s, d);
            }
        });
    Ok(out)
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// One block; `src` and `dst` have exactly the block's byte and value counts.
fn dequantize_block(ty: GgmlType, src: &[u8], dst: &mut [f32]) {
    match ty {
        GgmlType::F32 => dst[0] = f32::from_le_bytes([src[0], src[1], src[2], src[3]]),
        GgmlType::F16 => dst[0] = f16_at(src, 0),
        GgmlType::BF16 => dst[0] = bf16::from_bits(u16::from_le_bytes([src[0], src[1]])).to_f32(),
        GgmlType::Q8_0 => {
            let d = f16_at(src, 0);
            for (y, &q) in dst.iter_mut().zip(&src[2..34]) {
                *y = f32::from(q as i8) * d;
            }
        }
        GgmlType::Q4_0 => {
            let d = f16_at(src, 0);
            let (lo, hi) = dst.split_at_mut(16);
            for ((a, b), &q) in lo.iter_mut().zip(hi.iter_mut()).zip(&src[2..18]) {
                *a = f32::from((q & 0x0f) as i8 - 8) * d;
                *b = f32::from((q >> 4) as i8 - 8) * d;
            }
        }
        GgmlType::Q4_1 => {
            let d = f16_at(src, 0);
            let m = f16_at(src, 2);
            let (lo, hi) = dst.split_at_mut(16);
            for ((a, b), &q) in lo.iter_mut().zip(hi.iter_mut()).zip(&src[4..20]) {
                *a = f32::from(q & 0x0f) * d + m;
                *b = f32::from(q >> 4) * d + m;
            }
        }
        _ => unreachable!("dequantize() checked the type"),
    }
}

/// llama.cpp per-layer tensor suffixes, in [`hf_layer_tensor_names`] order.
const LAYER_SUFFIXES: [&str; 9] = [
    "attn_norm.weight",
    "attn_q.weight",
    "attn_k.weight",
    "attn_v.weight",
    "attn_output.weight",
    "ffn_norm.weight",
    "ffn_gate.weight",
    "ffn_up.weight",
    "ffn_down.weight",
];

/// Loads a LLaMA GGUF file: config from `llama.*` metadata, tokenizer from `tokenizer.ggml.*`,
/// every tensor dequantized to f32 under its Hugging Face name, with Q and K rows converted
/// from interleaved to `rotate_half` RoPE order.
pub fn load_gguf(path: &Path) -> Result<RawModel> {
    let file = GgufFile::open(path)?;
    load_gguf_file(&file)
}

/// [`load_gguf`] for an already opened file.
pub fn load_gguf_file(file: &GgufFile) -> Result<RawModel> {
    let path = file.path();
    match file.get("general.architecture") {
        None => return Err(file.err("metadata `general.architecture` is missing".to_string())),
        Some(GgufValue::String(arch)) if arch == "llama" => {}
        Some(GgufValue::String(arch)) => {
            return Err(ModelError::UnsupportedArchitecture {
                path: path.to_path_buf(),
                architecture: arch.clone(),
                supported: "llama",
            })
        }
        Some(other) => {
            return Err(file.err(format!(
                "metadata `general.architecture` must be a string, found {}",
                other.summary()
            )))
        }
    }

    let tokenizer = crate::tokenizer::tokenizer_from_gguf(file)?;
    let params = hyper_params(file, tokenizer.vocab_size(), &*tokenizer)?;
    params.validate(path)?;
    // Each layer has 9 tensors: bound the layer count by the file before planning per layer.
    let n_tensors = file.tensors().len();
    if params.num_hidden_layers > n_tensors / LAYER_SUFFIXES.len() {
        return Err(file.config_err(format!(
            "llama.block_count is {}, but the file has only {n_tensors} tensors",
            params.num_hidden_layers
        )));
    }
    let (hidden, heads, kv_heads, head_dim) = (
        params.hidden_size,
        params.num_attention_heads,
        params.num_key_value_heads,
        params.head_dim(),
    );
    let (ffn, vocab) = (params.intermediate_size, params.vocab_size);
    let (q_dim, kv_dim) = (heads * head_dim, params.kv_dim());

    // (gguf name, HF name, expected HF shape, RoPE heads to un-permute).
    let mut plan: Vec<(String, String, Vec<usize>, Option<usize>)> = vec![
        (
            "token_embd.weight".into(),
            "model.embed_tokens.weight".into(),
            vec![vocab, hidden],
            None,
        ),
        (
            "output_norm.weight".into(),
            "model.norm.weight".into(),
            vec![hidden],
            None,
        ),
    ];
    if !params.tie_word_embeddings {
        plan.push((
            "output.weight".into(),
            "lm_head.weight".into(),
            vec![vocab, hidden],
            None,
        ));
    }
    for layer in 0..params.num_hidden_layers {
        let shapes = [
            vec![hidden],
            vec![q_dim, hidden],
            vec![kv_dim, hidden],
            vec![kv_dim, hidden],
            vec![hidden, q_dim],
            vec![hidden],
            vec![ffn, hidden],
            vec![ffn, hidden],
            vec![hidden, ffn],
        ];
        let rope = [
            None,
            Some(heads),
            Some(kv_heads),
            None,
            None,
            None,
            None,
            None,
            None,
        ];
        for (((suffix, hf), shape), rope) in LAYER_SUFFIXES
            .iter()
            .zip(hf_layer_tensor_names(layer))
            .zip(shapes)
            .zip(rope)
        {
            plan.push((format!("blk.{layer}.{suffix}"), hf, shape, rope));
        }
    }

    // Every tensor in the file must be one we use: an unknown one (biases, Llama 3.1 RoPE
    // frequency factors, ...) would change the model's function if ignored.
    let planned: HashMap<&str, ()> = plan.iter().map(|(g, ..)| (g.as_str(), ())).collect();
    if let Some(extra) = file
        .tensors()
        .iter()
        .find(|t| !planned.contains_key(t.name.as_str()))
    {
        let reason = if extra.name == "rope_freqs.weight" {
            "tensor `rope_freqs.weight` (Llama 3.1-style RoPE frequency factors) is not supported"
                .to_string()
        } else {
            format!(
                "unexpected tensor `{}` for a llama model with {} layers",
                extra.name, params.num_hidden_layers
            )
        };
        return Err(file.err(reason));
    }
    let mut infos = Vec::with_capacity(plan.len());
    for (gguf_name, hf_name, shape, rope) in &plan {
        let info = file
            .tensor_info(gguf_name)
            .ok_or_else(|| ModelError::MissingTensor {
                path: path.to_path_buf(),
                name: gguf_name.clone(),
            })?;
        if info.shape() != *shape {
            return Err(ModelError::TensorShape {
                path: path.to_path_buf(),
                name: format!("{gguf_name} ({hf_name})"),
                expected: shape.clone(),
                actual: info.shape(),
            });
        }
        if !info.ggml_type.is_supported() {
            return Err(file.unsupported(info));
        }
        infos.push((info, hf_name, shape, *rope));
    }

    let mut tensors = BTreeMap::new();
    for (info, hf_name, shape, rope) in infos {
        let mut data = file.dequantize_info(info)?;
        if let Some(n_heads) = rope {
            data = unpermute_interleaved_rope(&data, n_heads, head_dim, hidden)?;
        }
        let t = finite_tensor(path, &info.name, data, shape)?;
        tensors.insert(hf_name.clone(), t);
    }

    Ok(RawModel {
        config: params.to_hf_config(),
        tensors,
        tokenizer,
        source: path.to_path_buf(),
        format: "gguf",
    })
}

fn hyper_params(
    file: &GgufFile,
    vocab_size: usize,
    tokenizer: &dyn crate::tokenizer::Tokenizer,
) -> Result<LlamaHyperParams> {
    let hidden = file.meta_usize("llama.embedding_length")?;
    let heads = file.meta_usize("llama.attention.head_count")?;
    let kv_heads = file
        .opt_meta_usize("llama.attention.head_count_kv")?
        .unwrap_or(heads);
    let head_dim = hidden.checked_div(heads).unwrap_or(0);
    // Partial rotary or decoupled head widths are not LLaMA as Hugging Face implements it.
    for key in [
        "llama.rope.dimension_count",
        "llama.attention.key_length",
        "llama.attention.value_length",
    ] {
        if let Some(v) = file.opt_meta_usize(key)? {
            if v != head_dim {
                return Err(file.config_err(format!(
                    "metadata `{key}` is {v}, but embedding_length / head_count is {head_dim}; only full-width heads and RoPE are supported"
                )));
            }
        }
    }
    if let Some(n) = file.opt_meta_usize("llama.vocab_size")? {
        if n != vocab_size {
            return Err(file.config_err(format!(
                "metadata `llama.vocab_size` is {n}, but the tokenizer has {vocab_size} tokens"
            )));
        }
    }
    let rope_scaling = rope_scaling(file)?;
    Ok(LlamaHyperParams {
        hidden_size: hidden,
        intermediate_size: file.meta_usize("llama.feed_forward_length")?,
        num_hidden_layers: file.meta_usize("llama.block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        rms_norm_eps: file
            .opt_meta_f64("llama.attention.layer_norm_rms_epsilon")?
            .ok_or_else(|| {
                file.config_err(
                    "metadata `llama.attention.layer_norm_rms_epsilon` is missing".to_string(),
                )
            })?,
        rope_theta: file
            .opt_meta_f64("llama.rope.freq_base")?
            .unwrap_or(10000.0),
        vocab_size,
        max_position_embeddings: file.meta_usize("llama.context_length")?,
        tie_word_embeddings: file.tensor_info("output.weight").is_none(),
        bos_token_id: tokenizer.bos_id(),
        eos_token_id: tokenizer.eos_id(),
        rope_scaling,
    })
}

fn rope_scaling(file: &GgufFile) -> Result<Option<serde_json::Value>> {
    let kind = file
        .opt_meta_str("llama.rope.scaling.type")?
        .map(str::to_string);
    // Early converters wrote a linear factor as `rope.scale_linear`.
    let factor = match file.opt_meta_f64("llama.rope.scaling.factor")? {
        Some(f) => Some(f),
        None => file.opt_meta_f64("llama.rope.scale_linear")?,
    };
    let original = file.opt_meta_usize("llama.rope.scaling.original_context_length")?;
    let kind = match (kind, factor) {
        (None, None) => return Ok(None),
        (Some(k), _) if k == "none" => return Ok(None),
        (Some(k), _) => k,
        // A factor without a type is linear scaling.
        (None, Some(_)) => "linear".to_string(),
    };
    let factor = factor.ok_or_else(|| {
        file.config_err(format!(
            "rope scaling type `{kind}` without `llama.rope.scaling.factor`"
        ))
    })?;
    if !(factor.is_finite() && factor > 0.0) {
        return Err(file.config_err(format!("rope scaling factor {factor} must be positive")));
    }
    match kind.as_str() {
        "linear" => Ok(Some(serde_json::json!({
            "rope_type": "linear", "type": "linear", "factor": factor
        }))),
        "yarn" => {
            let mut v =
                serde_json::json!({ "rope_type": "yarn", "type": "yarn", "factor": factor });
            if let (Some(n), Some(obj)) = (original, v.as_object_mut()) {
                obj.insert("original_max_position_embeddings".into(), n.into());
            }
            if let (Some(a), Some(obj)) = (
                file.opt_meta_f64("llama.rope.scaling.attn_factor")?,
                v.as_object_mut(),
            ) {
                obj.insert("attention_factor".into(), a.into());
            }
            Ok(Some(v))
        }
        other => Err(file.config_err(format!(
            "unsupported rope scaling type `{other}` (supported: none, linear, yarn)"
        ))),
    }
}

/// Shared by the tokenizer builder: the GGUF file as the place errors point at.
pub(crate) fn tokenizer_err(file: &GgufFile, reason: String) -> ModelError {
    ModelError::Tokenizer {
        path: file.path().to_path_buf(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small GGUF image: two metadata entries (a string, a nested array) and one Q8_0
    /// tensor. Parsed from memory, so the tests below also run under Miri
    /// (`cargo +nightly miri test -p sq-model --lib gguf::tests::parse`).
    fn tiny() -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(1u64.to_le_bytes());
        b.extend(2u64.to_le_bytes());
        let s = |b: &mut Vec<u8>, v: &str| {
            b.extend((v.len() as u64).to_le_bytes());
            b.extend(v.as_bytes());
        };
        s(&mut b, "general.architecture");
        b.extend(8u32.to_le_bytes());
        s(&mut b, "llama");
        s(&mut b, "x.nested");
        b.extend(9u32.to_le_bytes()); // array of arrays of u8
        b.extend(9u32.to_le_bytes());
        b.extend(2u64.to_le_bytes());
        for n in [1u64, 2] {
            b.extend(0u32.to_le_bytes());
            b.extend(n.to_le_bytes());
            b.extend(std::iter::repeat_n(7u8, n as usize));
        }
        s(&mut b, "t");
        b.extend(2u32.to_le_bytes());
        b.extend(32u64.to_le_bytes());
        b.extend(2u64.to_le_bytes());
        b.extend(8u32.to_le_bytes()); // Q8_0
        b.extend(0u64.to_le_bytes());
        b.resize(b.len().next_multiple_of(32), 0);
        for _ in 0..2 {
            b.extend(half::f16::from_f32(0.5).to_le_bytes());
            b.extend((0..32).map(|i| i as u8));
        }
        b
    }

    #[test]
    fn parse_truncations_and_flips_from_memory() {
        let good = tiny();
        let f = GgufFile::from_bytes(good.clone(), "tiny.gguf").unwrap();
        assert_eq!(f.architecture(), Some("llama"));
        assert_eq!(f.tensor_f32("t").unwrap().shape(), [2, 32]);
        for cut in 0..good.len() {
            assert!(
                GgufFile::from_bytes(good[..cut].to_vec(), "t.gguf").is_err(),
                "cut at {cut}"
            );
        }
        // Byte flips anywhere in the header: an error or a valid file, never a panic.
        let header_len = good.len() - 68;
        for pos in 0..header_len {
            for v in [0u8, 0xff, 0x80] {
                let mut b = good.clone();
                b[pos] = v;
                if let Ok(f) = GgufFile::from_bytes(b, "t.gguf") {
                    for t in f.tensors() {
                        let _ = f.tensor_f32(&t.name);
                    }
                }
            }
        }
    }

    #[test]
    fn type_table() {
        assert_eq!(GgmlType::Q4_1.block_layout(), Some((32, 20)));
        assert_eq!(GgmlType(12).to_string(), "Q4_K");
        assert_eq!(GgmlType(4).to_string(), "unknown type id 4");
        assert!(!GgmlType(12).is_supported());
        assert!(GgmlType::BF16.is_supported());
    }

    #[test]
    fn dequantize_rejects_partial_blocks_and_other_types() {
        assert!(dequantize(GgmlType::Q8_0, &[0u8; 33]).is_err());
        assert!(dequantize(GgmlType(12), &[0u8; 144]).is_err());
        assert_eq!(dequantize(GgmlType::Q4_0, &[]).unwrap(), Vec::<f32>::new());
    }

    #[test]
    fn parallel_chunks_cover_many_blocks() {
        // More than one rayon job: block k has scale 1 and every value k % 100 - 50.
        let n_blocks = 5000;
        let mut data = Vec::new();
        for k in 0..n_blocks {
            data.extend_from_slice(&f16::from_f32(1.0).to_le_bytes());
            data.extend(std::iter::repeat_n(((k % 100) as i8 - 50) as u8, 32));
        }
        let out = dequantize(GgmlType::Q8_0, &data).unwrap();
        assert_eq!(out.len(), n_blocks * 32);
        for (k, block) in out.chunks(32).enumerate() {
            assert!(
                block.iter().all(|&v| v == (k % 100) as f32 - 50.0),
                "block {k}"
            );
        }
    }
}
