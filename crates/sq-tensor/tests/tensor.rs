use sq_tensor::{bf16, f16, DType, Tensor, TensorError, TensorView};

#[test]
fn narrow_and_transpose_share_storage() {
    let t = Tensor::from_vec((0..24).map(|i| i as f32).collect::<Vec<_>>(), &[2, 3, 4]).unwrap();
    let n = t.narrow(1, 1, 2).unwrap();
    assert!(n.shares_storage_with(&t));
    assert_eq!(n.shape(), &[2, 2, 4]);
    assert!(!n.is_contiguous());
    assert_eq!(
        n.to_vec::<f32>().unwrap(),
        [4., 5., 6., 7., 8., 9., 10., 11., 16., 17., 18., 19., 20., 21., 22., 23.]
    );
    let tr = t.narrow(0, 1, 1).unwrap().transpose(1, 2).unwrap();
    assert!(tr.shares_storage_with(&t));
    assert_eq!(tr.shape(), &[1, 4, 3]);
    assert_eq!(tr.to_vec::<f32>().unwrap()[..4], [12., 16., 20., 13.]);
    // A contiguous narrow of the outer dim is directly addressable.
    let row = t.narrow(0, 1, 1).unwrap();
    assert!(row.is_contiguous());
    assert_eq!(row.as_slice::<f32>().unwrap()[0], 12.0);
    // contiguous() copies only when needed.
    assert!(row.contiguous().unwrap().shares_storage_with(&t));
    let c = tr.contiguous().unwrap();
    assert!(!c.shares_storage_with(&t));
    assert_eq!(c.to_vec::<f32>().unwrap(), tr.to_vec::<f32>().unwrap());
}

#[test]
fn views_borrow_without_copy() {
    let data: Vec<i8> = (0..12).map(|i| i as i8 - 6).collect();
    let v = TensorView::from_slice(&data, &[3, 4]).unwrap();
    let col = v.narrow(1, 2, 1).unwrap();
    assert_eq!(col.to_vec::<i8>().unwrap(), [-4, 0, 4]);
    let s = v.narrow(0, 1, 2).unwrap().as_slice::<i8>().unwrap();
    assert_eq!(s.as_ptr(), data[4..].as_ptr());
    assert_eq!(v.reshape(&[2, 6]).unwrap().shape(), &[2, 6]);
}

#[test]
fn conversions() {
    let x = Tensor::from_vec(vec![1.5f32, -2.25, 3.0e-3, 65504.0], &[4]).unwrap();
    let h = x.to_dtype(DType::F16).unwrap();
    assert_eq!(h.to_vec::<f16>().unwrap()[1], f16::from_f32(-2.25));
    let b = x.to_dtype(DType::BF16).unwrap();
    assert_eq!(b.to_vec::<bf16>().unwrap()[0], bf16::from_f32(1.5));
    assert_eq!(b.to_f32_vec().unwrap()[0], 1.5);
    let q = Tensor::from_vec(vec![-128i8, 0, 127], &[3]).unwrap();
    assert_eq!(
        q.to_dtype(DType::I32).unwrap().to_vec::<i32>().unwrap(),
        [-128, 0, 127]
    );
    assert_eq!(q.to_f32_vec().unwrap(), [-128.0, 0.0, 127.0]);
    assert!(matches!(
        x.to_dtype(DType::I8),
        Err(TensorError::UnsupportedConversion {
            from: DType::F32,
            to: DType::I8
        })
    ));
    assert!(matches!(
        x.to_vec::<i32>(),
        Err(TensorError::DTypeMismatch { .. })
    ));
}

#[test]
fn shape_errors_are_named_not_panics() {
    let t = Tensor::zeros(DType::F32, &[2, 3]).unwrap();
    let err = t.narrow(1, 2, 2).unwrap_err();
    assert!(err.to_string().contains("[2, 3]"), "{err}");
    assert!(t.narrow(5, 0, 1).is_err());
    assert!(t.transpose(0, 2).is_err());
    assert!(t.reshape(&[4, 2]).is_err());
    assert!(t.transpose(0, 1).unwrap().reshape(&[6]).is_err());
    assert!(Tensor::from_vec(vec![1.0f32; 5], &[2, 3]).is_err());
    assert!(Tensor::zeros(DType::F32, &[usize::MAX, 2]).is_err());
    // Empty tensors are valid.
    let e = Tensor::zeros(DType::BF16, &[0, 7]).unwrap();
    assert_eq!(e.numel(), 0);
    assert!(e.to_f32_vec().unwrap().is_empty());
}

#[test]
fn owned_storage_is_aligned() {
    for dtype in DType::ALL {
        let t = Tensor::zeros(dtype, &[3, 5]).unwrap();
        let ptr = t.view().contiguous_bytes().unwrap().as_ptr() as usize;
        assert_eq!(ptr % sq_tensor::ALIGNMENT, 0, "{dtype}");
    }
}
