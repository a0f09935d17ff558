//! The process-wide counters: host reads and live tensor bytes. One test in its own binary,
//! because the counters are shared by every thread of the process.

#![allow(clippy::unwrap_used)] // tests may unwrap (COMMON.md)

use megamoe_tensor::{host_reads, live_bytes, peak_bytes, reset_peak_bytes, DType, Device, Tensor};

#[test]
fn host_reads_count_every_explicit_read_and_live_bytes_follow_buffers() {
    let base_bytes = live_bytes();
    let x = Tensor::zeros([1000], DType::F32, Device::Cpu).unwrap();
    let i = Tensor::arange_i32(10, Device::Cpu).unwrap();
    let b = x.to_dtype(DType::BF16).unwrap();
    assert_eq!(live_bytes() - base_bytes, 4000 + 40 + 2000);

    // ops, views and clones read nothing
    let r0 = host_reads();
    let s = x.sum_all().unwrap();
    let view = x.narrow(0, 10, 20).unwrap().reshape([4, 5]).unwrap();
    let _copy = view.clone();
    assert_eq!(host_reads(), r0);
    // views share the buffer: no new bytes beyond the 4-byte sum
    assert_eq!(live_bytes() - base_bytes, 6040 + 4);

    // every host-read call counts one, a batch counts one for all its tensors
    x.to_host_f32().unwrap();
    i.to_host_i32().unwrap();
    b.to_host_bf16().unwrap();
    s.to_scalar_f32().unwrap();
    assert_eq!(host_reads() - r0, 4);
    let all = Tensor::to_host_batch_f32(&[&s, &i, &b]).unwrap();
    assert_eq!(host_reads() - r0, 5);
    assert_eq!(all[1], (0..10).map(|v| v as f32).collect::<Vec<_>>());
    assert_eq!(all[2].len(), 1000);

    // dropping the last handle frees the bytes; the peak remembers until reset
    let peak_before = peak_bytes();
    drop(b);
    assert_eq!(live_bytes() - base_bytes, 4044);
    assert!(peak_bytes() >= peak_before);
    reset_peak_bytes();
    assert_eq!(peak_bytes(), live_bytes());
    let big = Tensor::zeros([1 << 16], DType::F32, Device::Cpu).unwrap();
    drop(big);
    assert_eq!(peak_bytes(), live_bytes() + (1 << 18));
}
