//! TensorBoard scalars next to `metrics.jsonl`: one
//! `events.out.tfevents.<unix seconds>.megamoe` file per process in the run
//! directory, so `tensorboard --logdir runs/` shows every run (a resumed run
//! adds a file; TensorBoard joins them by step).
//!
//! The file is TensorFlow's event format written directly, because the
//! maintained Rust TensorBoard writers pull in a protobuf code generator and
//! image libraries. The format is small and stable: a sequence of records
//! `u64 length | u32 masked crc32c(length) | bytes | u32 masked crc32c(bytes)`
//! (little endian), each holding one `Event` protobuf message; a scalar is
//! `Event { wall_time = 1, step = 2, summary = 5 { value = 1 { tag = 1,
//! simple_value = 2 } } }`, and the first record is `Event { file_version = 3
//! = "brain.Event:2" }`. The CRC is the `crc32c` crate's.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};
use crate::metrics::{EvalMetrics, StepMetrics};

/// Writes scalar events; see the module doc.
#[derive(Debug)]
pub struct TensorBoardWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl TensorBoardWriter {
    /// Creates a new event file in `dir` and writes the file-version record.
    pub fn create(dir: &Path) -> Result<Self> {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut n = 0;
        let (path, file) = loop {
            let suffix = if n == 0 {
                String::new()
            } else {
                format!("-{n}")
            };
            let path = dir.join(format!("events.out.tfevents.{secs}.megamoe{suffix}"));
            match File::options().write(true).create_new(true).open(&path) {
                Ok(f) => break (path, f),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => n += 1,
                Err(e) => return Err(Error::io("create", &path, e)),
            }
        };
        let mut w = TensorBoardWriter {
            path,
            out: BufWriter::new(file),
        };
        let mut event = Vec::new();
        put_f64(&mut event, 1, wall_time());
        put_bytes(&mut event, 3, b"brain.Event:2");
        w.record(&event)?;
        w.flush()?;
        Ok(w)
    }

    /// The event file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Scalars of one training step: losses, learning rates, gradient norm,
    /// throughput, MFU.
    pub fn step(&mut self, m: &StepMetrics) -> Result<()> {
        let mut scalars = vec![
            ("train/loss", m.loss.total),
            ("train/loss_lm", m.loss.lm),
            ("train/grad_norm", m.grad_norm),
            ("train/lr", m.lr),
            ("train/tokens_per_s", m.tokens_per_s),
        ];
        for (tag, v) in [
            ("train/loss_aux", m.loss.aux),
            ("train/loss_z", m.loss.z),
            ("train/loss_mtp", m.loss.mtp),
            ("train/loss_skip", m.loss.skip),
        ] {
            if v != 0.0 {
                scalars.push((tag, v));
            }
        }
        if let Some(lr) = m.muon_lr {
            scalars.push(("train/lr_muon", lr));
        }
        if let Some(mfu) = m.mfu {
            scalars.push(("train/mfu", mfu));
        }
        if let Some(load) = m.max_load() {
            scalars.push(("moe/max_load", load));
            scalars.push(("moe/drop_fraction", m.drop_fraction()));
        }
        self.scalars(m.step, &scalars)
    }

    /// Scalars of one evaluation: the held-out loss and each domain's.
    pub fn eval(&mut self, e: &EvalMetrics) -> Result<()> {
        let tags: Vec<(String, f64)> = std::iter::once(("eval/loss".to_string(), e.loss))
            .chain(
                e.per_domain
                    .iter()
                    .map(|d| (format!("eval/{}", d.domain), d.loss)),
            )
            .collect();
        let refs: Vec<(&str, f64)> = tags.iter().map(|(t, v)| (t.as_str(), *v)).collect();
        self.scalars(e.step, &refs)
    }

    /// One event holding `scalars` at `step`, flushed.
    pub fn scalars(&mut self, step: u64, scalars: &[(&str, f64)]) -> Result<()> {
        let mut summary = Vec::new();
        for &(tag, value) in scalars {
            let mut v = Vec::new();
            put_bytes(&mut v, 1, tag.as_bytes());
            put_f32(&mut v, 2, value as f32);
            put_bytes(&mut summary, 1, &v);
        }
        let mut event = Vec::new();
        put_f64(&mut event, 1, wall_time());
        put_varint_field(&mut event, 2, step);
        put_bytes(&mut event, 5, &summary);
        self.record(&event)?;
        self.flush()
    }

    fn record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut buf = Vec::with_capacity(data.len() + 16);
        buf.extend_from_slice(&len);
        buf.extend_from_slice(&masked_crc(&len).to_le_bytes());
        buf.extend_from_slice(data);
        buf.extend_from_slice(&masked_crc(data).to_le_bytes());
        self.out
            .write_all(&buf)
            .map_err(|e| Error::io("write", &self.path, e))
    }

    fn flush(&mut self) -> Result<()> {
        self.out
            .flush()
            .map_err(|e| Error::io("write", &self.path, e))
    }
}

fn wall_time() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// TensorFlow's masked CRC: rotate right by 15 bits, add a constant.
fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

/// Protobuf wire types: 0 varint, 1 64-bit, 2 length-delimited, 5 32-bit.
fn put_key(buf: &mut Vec<u8>, field: u64, wire_type: u64) {
    put_varint(buf, (field << 3) | wire_type);
}

fn put_varint_field(buf: &mut Vec<u8>, field: u64, v: u64) {
    put_key(buf, field, 0);
    put_varint(buf, v);
}

fn put_f64(buf: &mut Vec<u8>, field: u64, v: f64) {
    put_key(buf, field, 1);
    buf.extend_from_slice(&v.to_le_bytes());
}

fn put_f32(buf: &mut Vec<u8>, field: u64, v: f32) {
    put_key(buf, field, 5);
    buf.extend_from_slice(&v.to_le_bytes());
}

fn put_bytes(buf: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    put_key(buf, field, 2);
    put_varint(buf, bytes.len() as u64);
    buf.extend_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_dir::TestDir;

    #[test]
    fn masked_crc_matches_tensorflow_reference_values() {
        // crc32c("123456789") = 0xE3069283 (the CRC-32C check value, RFC 3720);
        // masked by hand: rotr15 = 0x2507C60D, + 0xA282EAD8 = 0xC78AB0E5.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(masked_crc(b"123456789"), 0xC78A_B0E5);
    }

    #[test]
    fn varints_follow_the_protobuf_encoding() {
        let mut b = Vec::new();
        put_varint(&mut b, 300);
        assert_eq!(b, [0xAC, 0x02]); // the protobuf documentation's example
        let mut b = Vec::new();
        put_varint_field(&mut b, 2, 1);
        assert_eq!(b, [0x10, 0x01]);
    }

    /// Reads the records back, checking both CRCs of each.
    fn read_records(path: &Path) -> Vec<Vec<u8>> {
        let bytes = std::fs::read(path).unwrap();
        let mut out = Vec::new();
        let mut at = 0;
        while at < bytes.len() {
            let len_bytes = &bytes[at..at + 8];
            let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
            let crc = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap());
            assert_eq!(crc, masked_crc(len_bytes));
            let data = &bytes[at + 12..at + 12 + len];
            let crc = u32::from_le_bytes(bytes[at + 12 + len..at + 16 + len].try_into().unwrap());
            assert_eq!(crc, masked_crc(data));
            out.push(data.to_vec());
            at += 16 + len;
        }
        out
    }

    #[test]
    fn an_event_file_holds_the_version_then_framed_scalar_events() {
        let dir = TestDir::new("tensorboard_events");
        let mut w = TensorBoardWriter::create(dir.path()).unwrap();
        w.scalars(7, &[("train/loss", 2.5)]).unwrap();
        let records = read_records(w.path());
        assert_eq!(records.len(), 2);
        // Version event: wall_time (0x09 + 8 bytes), then field 3 "brain.Event:2".
        assert_eq!(records[0][0], 0x09);
        assert_eq!(&records[0][9..11], &[0x1A, 13]);
        assert_eq!(&records[0][11..], b"brain.Event:2");
        // Scalar event: wall_time, step 7, summary { value { tag, simple_value 2.5f } }.
        let e = &records[1];
        assert_eq!(&e[9..11], &[0x10, 7]);
        let mut value = vec![0x0A, 10];
        value.extend_from_slice(b"train/loss");
        value.push(0x15);
        value.extend_from_slice(&2.5f32.to_le_bytes());
        let mut summary = vec![0x0A, value.len() as u8];
        summary.extend_from_slice(&value);
        let mut expected = vec![0x2A, summary.len() as u8];
        expected.extend_from_slice(&summary);
        assert_eq!(&e[11..], &expected[..]);
    }
}
