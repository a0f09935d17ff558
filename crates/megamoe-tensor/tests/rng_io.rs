//! Named counter-based RNG (layout invariance, distribution) and safetensors round trips.

#![allow(clippy::unwrap_used)] // tests may unwrap (COMMON.md)

mod common;
use common::*;
use megamoe_tensor::{
    bf16, load_safetensors, save_safetensors, DType, Device, Error, InitDist, Shape, Tensor,
};

#[test]
fn randn_row_and_column_slices_concatenate_to_the_whole() {
    let shape = [10, 6];
    let whole = Tensor::randn_named(7, "layers.0.w", shape, 0.02, Device::Cpu).unwrap();
    let parts: Vec<Tensor> = [0..3, 3..3, 3..10]
        .into_iter()
        .map(|r| Tensor::randn_named_rows(7, "layers.0.w", shape, r, 0.02, Device::Cpu).unwrap())
        .collect();
    let refs: Vec<&Tensor> = parts.iter().collect();
    assert!(same_bits(
        &host(&Tensor::cat(&refs, 0).unwrap()),
        &host(&whole)
    ));
    let g = Shape::from(shape);
    let dist = InitDist::Normal { std: 0.02 };
    let c0 = Tensor::rand_named_slice(7, "layers.0.w", &g, 1, 0..4, dist, Device::Cpu).unwrap();
    let c1 = Tensor::rand_named_slice(7, "layers.0.w", &g, 1, 4..6, dist, Device::Cpu).unwrap();
    assert!(same_bits(
        &host(&Tensor::cat(&[&c0, &c1], 1).unwrap()),
        &host(&whole)
    ));
    // thread count does not matter
    let again = in_pool(3, || {
        host(&Tensor::randn_named(7, "layers.0.w", shape, 0.02, Device::Cpu).unwrap())
    });
    assert!(same_bits(&again, &host(&whole)));
    assert!(Tensor::randn_named_rows(7, "w", shape, 5..11, 1.0, Device::Cpu).is_err());
}

#[test]
fn randn_depends_on_seed_and_name_and_has_normal_moments() {
    let n = 200_000;
    let a = host(&Tensor::randn_named(1, "a", [n], 2.0, Device::Cpu).unwrap());
    let b = host(&Tensor::randn_named(1, "b", [n], 2.0, Device::Cpu).unwrap());
    let c = host(&Tensor::randn_named(2, "a", [n], 2.0, Device::Cpu).unwrap());
    assert!(a != b && a != c);
    let mean = a.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
    let var = a.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n as f64;
    // standard errors: mean 2/√n ≈ 0.0045, variance 4·√(2/n) ≈ 0.013; allow ~5σ
    assert!(mean.abs() < 0.025, "mean {mean}");
    assert!((var - 4.0).abs() < 0.07, "var {var}");
    let within1 = a.iter().filter(|v| v.abs() < 2.0).count() as f64 / n as f64;
    assert!((within1 - 0.6827).abs() < 0.006, "P(|z|<1) = {within1}");
    let u = host(
        &Tensor::rand_named_slice(
            3,
            "u",
            &Shape::from([n]),
            0,
            0..n,
            InitDist::Uniform { lo: -1.0, hi: 3.0 },
            Device::Cpu,
        )
        .unwrap(),
    );
    assert!(u.iter().all(|&v| (-1.0..3.0).contains(&v)));
    let um = u.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
    assert!((um - 1.0).abs() < 0.02, "uniform mean {um}"); // se = 4/√12/√n ≈ 0.0026
}

#[test]
fn safetensors_round_trip_all_dtypes_and_typed_errors() {
    let dir = std::env::temp_dir().join(format!("megamoe-tensor-io-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("t.safetensors");
    let f = rand_t(90, &[3, 4]);
    let b = Tensor::from_vec_bf16(
        vec![bf16::from_f32(1.5), bf16::from_f32(-0.25)],
        [2],
        Device::Cpu,
    )
    .unwrap();
    let i = Tensor::from_vec_i32(vec![7, -100, 3], [3, 1], Device::Cpu).unwrap();
    save_safetensors(&path, &[("w", &f), ("b", &b), ("idx", &i)]).unwrap();
    let back = load_safetensors(&path).unwrap();
    let names: Vec<&str> = back.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, vec!["b", "idx", "w"]);
    assert_eq!(back[0].1.dtype(), DType::BF16);
    assert_eq!(back[0].1.to_host_bf16().unwrap(), b.to_host_bf16().unwrap());
    assert_eq!(back[1].1.dims(), &[3, 1]);
    assert_eq!(back[1].1.to_host_i32().unwrap(), vec![7, -100, 3]);
    assert!(same_bits(&host(&back[2].1), &host(&f)));
    assert!(matches!(
        load_safetensors(dir.join("missing.safetensors")),
        Err(Error::Io { .. })
    ));
    std::fs::write(
        dir.join("bad.safetensors"),
        b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}",
    )
    .unwrap();
    assert!(matches!(
        load_safetensors(dir.join("bad.safetensors")),
        Err(Error::SafeTensors { .. })
    ));
    // an F64 tensor written by hand: header + 8 bytes
    let header = br#"{"x":{"dtype":"F64","shape":[1],"data_offsets":[0,8]}}"#;
    let mut raw = (header.len() as u64).to_le_bytes().to_vec();
    raw.extend_from_slice(header);
    raw.extend_from_slice(&1.0f64.to_le_bytes());
    std::fs::write(dir.join("f64.safetensors"), raw).unwrap();
    assert!(matches!(
        load_safetensors(dir.join("f64.safetensors")),
        Err(Error::UnsupportedFileDType { ref name, .. }) if name == "x"
    ));
    std::fs::remove_dir_all(&dir).unwrap();
}
