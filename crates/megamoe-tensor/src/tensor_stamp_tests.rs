//! Write stamps of tensor buffers (`Tensor::write_stamp`).

use crate::{Device, Tensor};

// The stamp names the elements: equal for every handle on an unwritten buffer, changed
// by an in-place write, never shared by another buffer (a copy-on-write, a deep copy).
#[test]
#[allow(clippy::unwrap_used)]
fn in_place_writes_and_new_buffers_change_the_write_stamp() {
    let x = Tensor::from_vec_f32(vec![1.0, 2.0, 3.0], [3], Device::Cpu).unwrap();
    let ones = Tensor::from_vec_f32(vec![1.0; 3], [3], Device::Cpu).unwrap();
    let mut w = x.deep_copy().unwrap();
    assert_ne!(
        w.write_stamp().0,
        x.write_stamp().0,
        "deep copy: another serial"
    );
    let before = w.write_stamp();
    assert_eq!(
        w.clone().write_stamp(),
        before,
        "a clone is the same buffer"
    );
    w.add_assign(&ones).unwrap();
    let after = w.write_stamp();
    assert_eq!(after.0, before.0, "written in place: same buffer");
    assert_ne!(after.1, before.1, "an in-place write counts");
    // Shared: the write copies, so the other handle keeps its stamp and its values.
    let held = w.clone();
    w.add_assign(&ones).unwrap();
    assert_eq!(held.write_stamp(), after, "the held handle was not written");
    assert_ne!(w.write_stamp().0, after.0, "copy-on-write: another serial");
    assert_eq!(held.to_host_f32().unwrap(), vec![2.0, 3.0, 4.0]);
}
