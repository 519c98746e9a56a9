use sq_tensor::{
    atomic::write_atomic, bf16, f16, save_safetensors, Checkpoint, DType, SafetensorsFile, Tensor,
    TensorError, TensorSource,
};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

fn sample(dtype: DType, shape: &[usize], seed: usize) -> Tensor {
    let n: usize = shape.iter().product();
    let vals = (0..n).map(|i| ((i * 7 + seed * 13) % 23) as f32 - 11.0);
    match dtype {
        DType::F32 => Tensor::from_vec(vals.map(|v| v * 0.37).collect(), shape),
        DType::F16 => Tensor::from_vec(vals.map(|v| f16::from_f32(v * 0.5)).collect(), shape),
        DType::BF16 => Tensor::from_vec(vals.map(|v| bf16::from_f32(v * 0.25)).collect(), shape),
        DType::I8 => Tensor::from_vec(vals.map(|v| v as i8).collect(), shape),
        DType::U8 => Tensor::from_vec(vals.map(|v| (v + 11.0) as u8).collect(), shape),
        DType::I32 => Tensor::from_vec(vals.map(|v| v as i32 * 100_000).collect(), shape),
    }
    .unwrap()
}

fn bytes_of(t: &Tensor) -> Vec<u8> {
    t.contiguous()
        .unwrap()
        .view()
        .contiguous_bytes()
        .unwrap()
        .to_vec()
}

#[test]
fn round_trip_every_dtype_with_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("all.safetensors");
    let mut tensors = Vec::new();
    for (i, dtype) in DType::ALL.into_iter().enumerate() {
        tensors.push((format!("t.{dtype}"), sample(dtype, &[3, i + 1], i)));
    }
    // A scalar, an empty tensor and a strided view also round-trip.
    tensors.push(("scalar".into(), sample(DType::F32, &[], 9)));
    tensors.push(("empty".into(), sample(DType::I8, &[0, 4], 1)));
    let base = sample(DType::F32, &[4, 5], 3);
    tensors.push(("strided".into(), base.transpose(0, 1).unwrap()));
    let meta = BTreeMap::from([
        ("format".to_string(), "pt".to_string()),
        ("scheme".to_string(), "w8a8".to_string()),
    ]);
    save_safetensors(&path, &tensors, Some(&meta)).unwrap();

    let file = SafetensorsFile::open(&path).unwrap();
    assert_eq!(file.user_metadata().unwrap().get("scheme").unwrap(), "w8a8");
    assert_eq!(file.names().len(), tensors.len());
    for (name, t) in &tensors {
        let loaded = file.tensor(name).unwrap();
        assert!(loaded.is_mapped());
        assert_eq!(loaded.dtype(), t.dtype(), "{name}");
        assert_eq!(loaded.shape(), t.shape(), "{name}");
        assert_eq!(bytes_of(&loaded), bytes_of(t), "{name}");
        // Our writer keeps every tensor aligned, so typed zero-copy access works.
        if loaded.numel() > 0 && t.dtype() == DType::F32 {
            assert_eq!(
                loaded.as_slice::<f32>().unwrap(),
                &t.to_vec::<f32>().unwrap()[..]
            );
        }
    }
    // The reference parser agrees with what we wrote.
    let raw = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&raw).unwrap();
    assert_eq!(st.len(), tensors.len());
}

#[test]
fn reads_files_written_by_the_reference_implementation() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ref.safetensors");
    let data: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2, 2], &data).unwrap();
    safetensors::serialize_to_file([("w", view)], None, &path).unwrap();
    let t = SafetensorsFile::open(&path).unwrap().tensor("w").unwrap();
    assert_eq!(t.to_f32_vec().unwrap(), [1.0, 2.0, 3.0, 4.0]);
}

fn write_sharded(dir: &Path) -> BTreeMap<String, Tensor> {
    let mut all = BTreeMap::new();
    let mut weight_map = serde_json::Map::new();
    for shard in 0..3 {
        let file = format!("model-{:05}-of-00003.safetensors", shard + 1);
        let mut tensors = Vec::new();
        for j in 0..2 {
            let name = format!("model.layers.{}.w{j}", shard * 2 + j);
            let t = sample(DType::BF16, &[2, 3 + j], shard * 2 + j);
            weight_map.insert(name.clone(), file.clone().into());
            all.insert(name.clone(), t.clone());
            tensors.push((name, t));
        }
        save_safetensors(dir.join(&file), &tensors, None).unwrap();
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::to_string_pretty(&index).unwrap(),
    )
    .unwrap();
    all
}

#[test]
fn sharded_checkpoint_loads_from_dir_and_index() {
    let dir = tempfile::tempdir().unwrap();
    let expected = write_sharded(dir.path());
    for path in [
        dir.path().to_path_buf(),
        dir.path().join("model.safetensors.index.json"),
    ] {
        let ckpt = Checkpoint::open(&path).unwrap();
        assert_eq!(ckpt.files().len(), 3);
        assert_eq!(ckpt.names().count(), expected.len());
        for (name, t) in &expected {
            let loaded = ckpt.tensor(name).unwrap();
            assert_eq!(loaded.shape(), t.shape());
            assert_eq!(loaded.to_f32_vec().unwrap(), t.to_f32_vec().unwrap());
            assert_eq!(ckpt.info(name).unwrap().dtype, DType::BF16);
        }
        let err = ckpt.tensor("nope").unwrap_err();
        assert!(err.to_string().contains("`nope`"), "{err}");
    }
}

#[test]
fn missing_shard_is_named() {
    let dir = tempfile::tempdir().unwrap();
    write_sharded(dir.path());
    std::fs::remove_file(dir.path().join("model-00002-of-00003.safetensors")).unwrap();
    let err = Checkpoint::open(dir.path()).err().unwrap();
    assert!(matches!(err, TensorError::MissingShard { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("model-00002-of-00003.safetensors"), "{msg}");
    assert!(msg.contains("model.safetensors.index.json"), "{msg}");
}

#[test]
fn index_cannot_escape_its_directory() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        r#"{"weight_map": {"w": "../../etc/passwd"}}"#,
    )
    .unwrap();
    let err = Checkpoint::open(dir.path()).err().unwrap();
    assert!(matches!(err, TensorError::InvalidIndex { .. }), "{err:?}");
    std::fs::write(dir.path().join("model.safetensors.index.json"), "{not json").unwrap();
    assert!(matches!(
        Checkpoint::open(dir.path()).err().unwrap(),
        TensorError::InvalidIndex { .. }
    ));
    let empty = tempfile::tempdir().unwrap();
    assert!(matches!(
        Checkpoint::open(empty.path()).err().unwrap(),
        TensorError::NoCheckpoint { .. }
    ));
}

/// A valid file's bytes: 2 tensors, f32 [2,2] and i8 [3].
fn valid_file() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.safetensors");
    save_safetensors(
        &path,
        &[
            ("a".to_string(), sample(DType::F32, &[2, 2], 0)),
            ("b".to_string(), sample(DType::I8, &[3], 0)),
        ],
        None,
    )
    .unwrap();
    std::fs::read(path).unwrap()
}

fn with_header(header: &str, data_len: usize) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend(std::iter::repeat_n(0u8, data_len));
    out
}

fn open_bytes(bytes: &[u8]) -> Result<SafetensorsFile, TensorError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.safetensors");
    std::fs::write(&path, bytes).unwrap();
    SafetensorsFile::open(&path)
}

#[test]
fn truncated_files_give_named_errors() {
    let good = valid_file();
    assert!(open_bytes(&good).is_ok());
    // Every truncation point, from empty to one byte short, fails cleanly.
    for len in 0..good.len() {
        let err = open_bytes(&good[..len])
            .err()
            .unwrap_or_else(|| panic!("length {len} opened"));
        let msg = err.to_string();
        assert!(msg.contains("bad.safetensors"), "{msg}");
        assert!(
            matches!(
                err,
                TensorError::InvalidHeader { .. } | TensorError::Truncated { .. }
            ),
            "{len}: {err:?}"
        );
    }
    let err = open_bytes(&good[..good.len() - 1]).err().unwrap();
    assert!(matches!(err, TensorError::Truncated { .. }), "{err:?}");
    // Trailing garbage is an error too (the data must be exactly covered).
    let mut long = good.clone();
    long.push(0);
    assert!(open_bytes(&long).is_err());
}

#[test]
fn header_length_past_end() {
    let mut bytes = valid_file();
    bytes[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let msg = open_bytes(&bytes).err().unwrap().to_string();
    assert!(msg.contains("header length"), "{msg}");
    let len = bytes.len() as u64;
    bytes[..8].copy_from_slice(&len.to_le_bytes());
    let msg = open_bytes(&bytes).err().unwrap().to_string();
    assert!(msg.contains("past the end"), "{msg}");
}

#[test]
fn unknown_and_unsupported_dtypes() {
    let err = open_bytes(&with_header(
        r#"{"w":{"dtype":"Q4","shape":[2],"data_offsets":[0,1]}}"#,
        1,
    ))
    .err()
    .unwrap();
    match &err {
        TensorError::UnsupportedDtype { name, dtype, .. } => {
            assert_eq!(name, "w");
            assert_eq!(dtype, "Q4");
        }
        other => panic!("{other:?}"),
    }
    // F64 is valid safetensors but not ours: the file opens, that tensor is refused by name.
    let file = open_bytes(&with_header(
        r#"{"d":{"dtype":"F64","shape":[1],"data_offsets":[0,8]},"f":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}"#,
        12,
    ))
    .unwrap();
    assert!(file.tensor("f").is_ok());
    let err = file.tensor("d").unwrap_err();
    assert!(
        matches!(err, TensorError::UnsupportedDtype { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("`d`"));
}

#[test]
fn shape_byte_length_mismatch_names_the_tensor() {
    let err = open_bytes(&with_header(
        r#"{"layer.w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,20]}}"#,
        20,
    ))
    .err()
    .unwrap();
    let msg = err.to_string();
    assert!(
        matches!(
            err,
            TensorError::ByteLengthMismatch {
                expected: 24,
                actual: 20,
                ..
            }
        ),
        "{msg}"
    );
    assert!(
        msg.contains("layer.w") && msg.contains("[2, 3]") && msg.contains("F32"),
        "{msg}"
    );
}

#[test]
fn malformed_headers() {
    for (header, data) in [
        ("not json at all", 0),
        (
            r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}}"#,
            4,
        ),
        (
            r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"v":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
            4,
        ),
        (
            r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
            8,
        ),
        (
            r#"{"w":{"dtype":"F32","shape":[18446744073709551615,2],"data_offsets":[0,8]}}"#,
            8,
        ),
        (
            r#"{"w":{"dtype":"F32","shape":"x","data_offsets":[0,4]}}"#,
            4,
        ),
        (r#"[1,2,3]"#, 0),
    ] {
        let err = open_bytes(&with_header(header, data)).err();
        assert!(err.is_some(), "{header} was accepted");
    }
}

/// A tensor source that fails after writing part of its data, like a crash midway.
struct FailingSource(Vec<usize>);

impl TensorSource for FailingSource {
    fn dtype(&self) -> DType {
        DType::F32
    }
    fn shape(&self) -> &[usize] {
        &self.0
    }
    fn write_data(&self, out: &mut dyn Write) -> sq_tensor::Result<()> {
        out.write_all(&[0u8; 16]).unwrap();
        Err(TensorError::Write {
            path: "<test>".into(),
            name: "failing".into(),
            reason: "simulated failure".into(),
        })
    }
}

fn dir_entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn interrupted_write_leaves_no_file_and_keeps_the_previous_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.safetensors");
    let err =
        save_safetensors(&path, &[("x".to_string(), FailingSource(vec![64]))], None).unwrap_err();
    assert!(err.to_string().contains("simulated failure"), "{err}");
    assert!(
        dir_entries(dir.path()).is_empty(),
        "{:?}",
        dir_entries(dir.path())
    );

    // With a previous output in place, a failed write leaves it byte-identical.
    save_safetensors(
        &path,
        &[("x".to_string(), sample(DType::F32, &[4], 0))],
        None,
    )
    .unwrap();
    let before = std::fs::read(&path).unwrap();
    assert!(save_safetensors(&path, &[("x".to_string(), FailingSource(vec![64]))], None).is_err());
    assert_eq!(std::fs::read(&path).unwrap(), before);
    assert_eq!(dir_entries(dir.path()), ["out.safetensors"]);

    // A source that writes the wrong number of bytes is caught and named.
    struct Short;
    impl TensorSource for Short {
        fn dtype(&self) -> DType {
            DType::I8
        }
        fn shape(&self) -> &[usize] {
            &[8]
        }
        fn write_data(&self, out: &mut dyn Write) -> sq_tensor::Result<()> {
            out.write_all(&[1, 2, 3])
                .map_err(|e| TensorError::io("x", "w", e))
        }
    }
    let err = save_safetensors(
        dir.path().join("s.safetensors"),
        &[("short".to_string(), Short)],
        None,
    )
    .unwrap_err();
    assert!(err.to_string().contains("`short`"), "{err}");
    assert_eq!(dir_entries(dir.path()), ["out.safetensors"]);
}

#[test]
fn write_atomic_and_atomic_dir() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("report.json");
    let r = write_atomic(&target, |w| {
        w.write_all(b"{\"partial\":").unwrap();
        Err(TensorError::Write {
            path: target.clone(),
            name: "-".into(),
            reason: "stop".into(),
        })
    });
    assert!(r.is_err());
    assert!(dir_entries(dir.path()).is_empty());
    write_atomic(&target, |w| {
        w.write_all(b"{}").map_err(|e| TensorError::io("x", "w", e))
    })
    .unwrap();
    assert_eq!(std::fs::read(&target).unwrap(), b"{}");

    let out = dir.path().join("quantized");
    {
        let d = sq_tensor::atomic::AtomicDir::create(&out, false).unwrap();
        std::fs::write(d.path().join("a"), "1").unwrap();
        // dropped without commit
    }
    assert!(!out.exists());
    let d = sq_tensor::atomic::AtomicDir::create(&out, false).unwrap();
    std::fs::write(d.path().join("a"), "1").unwrap();
    d.commit().unwrap();
    assert_eq!(std::fs::read_to_string(out.join("a")).unwrap(), "1");
    assert!(sq_tensor::atomic::AtomicDir::create(&out, false).is_err());
    let d = sq_tensor::atomic::AtomicDir::create(&out, true).unwrap();
    std::fs::write(d.path().join("b"), "2").unwrap();
    d.commit().unwrap();
    assert_eq!(dir_entries(&out), ["b"]);
    assert_eq!(dir_entries(dir.path()), ["quantized", "report.json"]);
}

#[test]
fn same_inputs_give_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let meta: BTreeMap<String, String> = (0..8)
        .map(|i| (format!("key{i}"), format!("value{i}")))
        .collect();
    let tensors: Vec<(String, Tensor)> = (0..6)
        .map(|i| (format!("t{i}"), sample(DType::ALL[i], &[2, i + 1], i)))
        .collect();
    let mut outputs = Vec::new();
    for run in 0..3 {
        let path = dir.path().join(format!("{run}.safetensors"));
        save_safetensors(&path, &tensors, Some(&meta)).unwrap();
        outputs.push(std::fs::read(path).unwrap());
    }
    assert!(
        outputs.windows(2).all(|w| w[0] == w[1]),
        "safetensors output is not deterministic"
    );
}

/// Every file of `dir` (name and bytes), sorted.
fn dir_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    files.sort();
    files
}

/// Tensors written to their planned places give the files `save_safetensors_sharded` writes,
/// whole or sharded; a plan given up half way (a tensor that does not fit) hands what it holds
/// to the scratch path, with the same result.
#[test]
fn placed_files_equal_the_sharded_save() {
    use sq_tensor::{save_safetensors_sharded, PlacedFiles, TensorSignature, TensorSpill};
    let tensors: Vec<(String, Tensor)> = vec![
        ("b.weight".into(), sample(DType::I8, &[8, 5], 1)),
        ("a.weight".into(), sample(DType::I8, &[3, 7], 2)),
        ("a.weight_scale".into(), sample(DType::F32, &[3], 3)),
        ("norm.weight".into(), sample(DType::F32, &[5], 4)),
        ("embed.weight".into(), sample(DType::F32, &[4, 6], 5)),
    ];
    let plan: Vec<(String, TensorSignature)> = tensors
        .iter()
        .map(|(n, t)| {
            (
                n.clone(),
                TensorSignature {
                    dtype: t.dtype(),
                    shape: t.shape().to_vec(),
                },
            )
        })
        .collect();
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    for max in [u64::MAX, 64, 1] {
        let want = tempfile::tempdir().unwrap();
        save_safetensors_sharded(want.path(), &tensors, Some(&meta), max).unwrap();

        let got = tempfile::tempdir().unwrap();
        let mut placed = PlacedFiles::create(got.path(), &plan, Some(&meta), max).unwrap();
        for (name, t) in tensors.iter().rev() {
            assert!(!placed.complete());
            assert!(placed.fits(name, t.dtype(), t.shape()));
            placed.write(name, t).unwrap();
            assert!(!placed.fits(name, t.dtype(), t.shape()), "written twice");
        }
        assert!(!placed.fits("a.weight", DType::F32, &[3, 7]));
        assert!(placed.complete());
        placed.finish().unwrap();
        assert_eq!(dir_files(got.path()), dir_files(want.path()), "max {max}");

        // Given up after two tensors: the rest goes through the scratch file.
        let fallback = tempfile::tempdir().unwrap();
        let mut placed = PlacedFiles::create(fallback.path(), &plan, Some(&meta), max).unwrap();
        for (name, t) in &tensors[..2] {
            placed.write(name, t).unwrap();
        }
        let scratch = tempfile::tempdir().unwrap();
        let mut spill = TensorSpill::create(scratch.path().join("spill")).unwrap();
        spill.adopt(placed).unwrap();
        for (name, t) in &tensors[2..] {
            spill.push(name, t).unwrap();
        }
        spill.finish(fallback.path(), Some(&meta), max).unwrap();
        assert_eq!(
            dir_files(fallback.path()),
            dir_files(want.path()),
            "fallback, max {max}"
        );
    }
    // An unfinished plan is an error, and nothing gets the final names.
    let dir = tempfile::tempdir().unwrap();
    let mut placed = PlacedFiles::create(dir.path(), &plan, None, u64::MAX).unwrap();
    placed.write("a.weight", &tensors[1].1).unwrap();
    assert!(placed.write("a.weight", &tensors[1].1).is_err());
    assert!(placed.write("zzz", &tensors[1].1).is_err());
    assert!(placed.finish().is_err());
    assert!(!dir.path().join("model.safetensors").exists());
}
