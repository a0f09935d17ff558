//! Data sources and the Batcher: determinism, resume, epochs, held-out split,
//! learnability of the synthetic corpus, and named errors for bad paths.

// Test helpers outside #[test] fns: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;
use common::TestDir;

use std::sync::Arc;

use megamoe_train::data::Split;
use megamoe_train::{
    heldout_batches, Batch, BatchConfig, Batcher, DataPosition, DataSource, Error, Tokenizer,
};

use std::collections::HashMap;

fn synthetic() -> Arc<DataSource> {
    Arc::new(DataSource::synthetic(Tokenizer::bytes()))
}

fn cfg(batch_size: usize, seq_len: usize, seed: u64) -> BatchConfig {
    BatchConfig {
        batch_size,
        seq_len,
        seed,
    }
}

/// Random lowercase text; windows of it are unique with overwhelming probability.
fn random_text(len: usize, seed: u64) -> String {
    // A 64-bit LCG (Knuth's MMIX constants); its top bits are uniform enough here.
    let mut state = seed;
    (0..len)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            char::from(b'a' + ((state >> 33) % 26) as u8)
        })
        .collect()
}

fn read(b: &mut Batcher, n: usize) -> Vec<Batch> {
    (0..n).map(|_| b.next_batch().unwrap()).collect()
}

#[test]
fn batch_targets_are_inputs_shifted_by_one() {
    let mut b = Batcher::new(synthetic(), cfg(3, 16, 1)).unwrap();
    let batch = b.next_batch().unwrap();
    assert_eq!(batch.inputs.len(), 3 * 16);
    assert_eq!(batch.targets.len(), 3 * 16);
    assert_eq!(batch.domains.len(), 3);
    for row in 0..3 {
        for t in 0..15 {
            assert_eq!(batch.targets[row * 16 + t], batch.inputs[row * 16 + t + 1]);
        }
    }
}

#[test]
fn batcher_same_seed_gives_same_batches_other_seed_differs() {
    let a = read(&mut Batcher::new(synthetic(), cfg(4, 32, 7)).unwrap(), 3);
    let b = read(&mut Batcher::new(synthetic(), cfg(4, 32, 7)).unwrap(), 3);
    let c = read(&mut Batcher::new(synthetic(), cfg(4, 32, 8)).unwrap(), 3);
    assert_eq!(a, b);
    assert_ne!(a, c);
}

#[test]
fn batcher_resumed_from_serialised_position_continues_identically() {
    let src = synthetic();
    let straight = read(&mut Batcher::new(src.clone(), cfg(2, 24, 3)).unwrap(), 5);
    let mut first = Batcher::new(src.clone(), cfg(2, 24, 3)).unwrap();
    read(&mut first, 2);
    let json = serde_json::to_string(&first.position()).unwrap();
    let pos: DataPosition = serde_json::from_str(&json).unwrap();
    let mut resumed = Batcher::new(src, cfg(2, 24, 3)).unwrap();
    resumed.seek(&pos).unwrap();
    assert_eq!(read(&mut resumed, 3), straight[2..]);
}

#[test]
fn text_batcher_resumed_across_epoch_boundary_continues_identically() {
    let dir = TestDir::new("data_text_resume");
    let file = dir.path().join("corpus.txt");
    std::fs::write(&file, random_text(400, 5)).unwrap();
    let src = Arc::new(DataSource::from_path(&file, Tokenizer::bytes()).unwrap());
    // 399 / 16 = 24 windows; 1 held out (round(24·0.05) = 1) → 23 train windows;
    // 10 batches of 3 = 30 sequences cross the first epoch boundary.
    assert_eq!(src.num_sequences(Split::Train, 16).unwrap(), Some(23));
    let straight = read(&mut Batcher::new(src.clone(), cfg(3, 16, 9)).unwrap(), 10);
    let mut first = Batcher::new(src.clone(), cfg(3, 16, 9)).unwrap();
    read(&mut first, 6);
    let mut resumed = Batcher::new(src, cfg(3, 16, 9)).unwrap();
    resumed.seek(&first.position()).unwrap();
    assert_eq!(read(&mut resumed, 4), straight[6..]);
}

#[test]
fn text_epoch_reads_every_train_window_once_and_no_heldout_window() {
    let dir = TestDir::new("data_text_epoch");
    let file = dir.path().join("corpus.txt");
    let text = random_text(1000, 11);
    std::fs::write(&file, &text).unwrap();
    let t = 20;
    let src = Arc::new(DataSource::from_path(&file, Tokenizer::bytes()).unwrap());
    // (1000 - 1) / 20 = 49 windows; round(49 · 0.05) = 2 held out; 47 train.
    let train = src.num_sequences(Split::Train, t).unwrap().unwrap();
    assert_eq!(train, 47);
    assert_eq!(src.num_sequences(Split::Heldout, t).unwrap(), Some(2));
    let mut b = Batcher::new(src.clone(), cfg(1, t, 4)).unwrap();
    let mut seen = vec![0usize; train as usize];
    for _ in 0..train {
        let batch = b.next_batch().unwrap();
        let row: String = batch.inputs.iter().map(|&x| char::from(x as u8)).collect();
        // Locate the window by content; it must start at a multiple of T.
        let start = text.find(&row).unwrap();
        assert_eq!(start % t, 0);
        let w = start / t;
        assert!((w as u64) < train, "window {w} is held out");
        seen[w] += 1;
    }
    assert!(seen.iter().all(|&c| c == 1), "{seen:?}");
    assert_eq!(b.epoch(), 1);
    // Held-out windows are the last two.
    let held = heldout_batches(&src, 2, t, 1).unwrap();
    let first: String = held[0].inputs[..t]
        .iter()
        .map(|&x| char::from(x as u8))
        .collect();
    assert_eq!(text.find(&first), Some(47 * t));
}

#[test]
fn synthetic_domains_are_all_used_roughly_uniformly() {
    let mut b = Batcher::new(synthetic(), cfg(60, 8, 2)).unwrap();
    let mut counts = [0usize; 6];
    for _ in 0..10 {
        for d in b.next_batch().unwrap().domains {
            counts[d.0 as usize] += 1;
        }
    }
    // 600 draws, 100 expected per domain, sd ≈ 9.1; 60 is > 4 sd below.
    assert!(counts.iter().all(|&c| c > 60), "{counts:?}");
}

fn get<K: std::hash::Hash + Eq>(m: &HashMap<K, f64>, k: K) -> f64 {
    m.get(&k).copied().unwrap_or(0.0)
}

/// Cross-entropy (nats/token) of an interpolated trigram model fitted on
/// training batches and scored on held-out batches. A trigram is far weaker than
/// a transformer, so beating ln(256)/2 with it shows the corpus is learnable.
#[test]
fn synthetic_corpus_is_learnable_far_below_uniform() {
    let src = synthetic();
    let mut b = Batcher::new(src.clone(), cfg(50, 64, 0)).unwrap();
    let mut uni: HashMap<i32, f64> = HashMap::new();
    let mut bi: HashMap<(i32, i32), f64> = HashMap::new();
    let mut bi_ctx: HashMap<i32, f64> = HashMap::new();
    let mut tri: HashMap<(i32, i32, i32), f64> = HashMap::new();
    let mut tri_ctx: HashMap<(i32, i32), f64> = HashMap::new();
    let mut total = 0.0;
    for _ in 0..20 {
        let batch = b.next_batch().unwrap();
        for row in 0..50 {
            let x = &batch.inputs[row * 64..(row + 1) * 64];
            let y = &batch.targets[row * 64..(row + 1) * 64];
            for t in 1..64 {
                *uni.entry(y[t]).or_default() += 1.0;
                *bi.entry((x[t], y[t])).or_default() += 1.0;
                *bi_ctx.entry(x[t]).or_default() += 1.0;
                *tri.entry((x[t - 1], x[t], y[t])).or_default() += 1.0;
                *tri_ctx.entry((x[t - 1], x[t])).or_default() += 1.0;
                total += 1.0;
            }
        }
    }
    let (mut nll, mut n) = (0.0, 0.0);
    for batch in heldout_batches(&src, 50, 64, 2).unwrap() {
        for row in 0..50 {
            let x = &batch.inputs[row * 64..(row + 1) * 64];
            let y = &batch.targets[row * 64..(row + 1) * 64];
            for t in 1..64 {
                // Add-one unigram, then Witten–Bell-like interpolation with weight 1.
                let p1 = (get(&uni, y[t]) + 1.0) / (total + 256.0);
                let p2 = (get(&bi, (x[t], y[t])) + p1) / (get(&bi_ctx, x[t]) + 1.0);
                let p3 = (get(&tri, (x[t - 1], x[t], y[t])) + p2)
                    / (get(&tri_ctx, (x[t - 1], x[t])) + 1.0);
                nll -= f64::ln(p3);
                n += 1.0;
            }
        }
    }
    let ce = nll / n;
    assert!(
        ce < 0.5 * f64::ln(256.0),
        "trigram cross-entropy {ce:.3} nats"
    );
}

#[test]
fn heldout_batches_do_not_depend_on_seed_and_repeat() {
    let src = synthetic();
    let a = heldout_batches(&src, 4, 32, 2).unwrap();
    assert_eq!(a, heldout_batches(&src, 4, 32, 2).unwrap());
    let train = Batcher::new(src.clone(), cfg(4, 32, 0))
        .unwrap()
        .next_batch()
        .unwrap();
    assert_ne!(a[0], train);
}

#[test]
fn directory_is_read_recursively_in_sorted_order_skipping_hidden() {
    let dir = TestDir::new("data_dir_order");
    std::fs::create_dir_all(dir.path().join("a")).unwrap();
    std::fs::create_dir_all(dir.path().join(".git")).unwrap();
    std::fs::write(dir.path().join("b.txt"), "BBBB").unwrap();
    std::fs::write(dir.path().join("a").join("c.txt"), "CCCC").unwrap();
    std::fs::write(dir.path().join(".hidden"), "HHHH").unwrap();
    std::fs::write(dir.path().join(".git").join("x"), "GGGG").unwrap();
    let src = DataSource::from_path(dir.path(), Tokenizer::bytes()).unwrap();
    // Sorted paths: <dir>/a/c.txt < <dir>/b.txt.
    let held = heldout_batches(&src, 1, 3, 1).unwrap();
    // 8 tokens, T=3: windows (8-1)/3 = 2, one held out: window 1 = tokens 3..7.
    assert_eq!(
        held[0].inputs,
        "CBB".bytes().map(i32::from).collect::<Vec<_>>()
    );
    assert_eq!(src.num_tokens(), Some(8));
}

#[test]
fn missing_empty_binary_and_short_data_are_named_errors() {
    let dir = TestDir::new("data_errors");
    let missing = dir.path().join("nope");
    let err = DataSource::from_path(&missing, Tokenizer::bytes()).unwrap_err();
    assert!(matches!(err, Error::DataPathMissing { .. }), "{err}");
    assert!(err.to_string().contains("nope"), "{err}");

    let empty_dir = dir.path().join("empty");
    std::fs::create_dir(&empty_dir).unwrap();
    let err = DataSource::from_path(&empty_dir, Tokenizer::bytes()).unwrap_err();
    assert!(matches!(err, Error::DataEmpty { .. }), "{err}");
    std::fs::write(empty_dir.join("zero.txt"), "").unwrap();
    let err = DataSource::from_path(&empty_dir, Tokenizer::bytes()).unwrap_err();
    assert!(matches!(err, Error::DataEmpty { .. }), "{err}");

    let binary = dir.path().join("bin.dat");
    std::fs::write(&binary, [b'o', b'k', 0xFF, 0xFE]).unwrap();
    let err = DataSource::from_path(&binary, Tokenizer::bytes()).unwrap_err();
    assert!(matches!(err, Error::DataNotText { offset: 2, .. }), "{err}");

    let short = dir.path().join("short.txt");
    std::fs::write(&short, "0123456789").unwrap();
    let src = Arc::new(DataSource::from_path(&short, Tokenizer::bytes()).unwrap());
    // 10 tokens, T=8: only one window of 9 tokens; train + held-out need 2·8+1 = 17.
    let err = Batcher::new(src, cfg(1, 8, 0)).unwrap_err();
    assert!(
        matches!(
            err,
            Error::DataTooShort {
                tokens: 10,
                needed: 17,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn seek_with_other_seed_or_corpus_is_error() {
    let mut b = Batcher::new(synthetic(), cfg(2, 8, 1)).unwrap();
    b.next_batch().unwrap();
    let pos = b.position();
    let mut other_seed = Batcher::new(synthetic(), cfg(2, 8, 2)).unwrap();
    let err = other_seed.seek(&pos).unwrap_err();
    assert!(err.to_string().contains("seed"), "{err}");

    let dir = TestDir::new("data_seek");
    let file = dir.path().join("t.txt");
    std::fs::write(&file, random_text(100, 1)).unwrap();
    let text = Arc::new(DataSource::from_path(&file, Tokenizer::bytes()).unwrap());
    let err = Batcher::new(text, cfg(2, 8, 1))
        .unwrap()
        .seek(&pos)
        .unwrap_err();
    assert!(matches!(err, Error::DataPositionMismatch { .. }), "{err}");
}

#[test]
fn zero_batch_or_seq_len_is_config_error() {
    let err = Batcher::new(synthetic(), cfg(0, 8, 0)).unwrap_err();
    assert!(err.to_string().contains("batch_size=0"), "{err}");
    let err = Batcher::new(synthetic(), cfg(1, 0, 0)).unwrap_err();
    assert!(err.to_string().contains("seq_len=0"), "{err}");
}

#[test]
fn batch_rows_split_matches_whole_batch() {
    let batch = Batcher::new(synthetic(), cfg(4, 8, 0))
        .unwrap()
        .next_batch()
        .unwrap();
    let top = batch.rows(0..2).unwrap();
    let bottom = batch.rows(2..4).unwrap();
    assert_eq!([top.inputs, bottom.inputs].concat(), batch.inputs);
    assert_eq!(bottom.domains, batch.domains[2..]);
    assert_eq!(batch.token_domains().len(), 32);
    assert_eq!(batch.token_domains()[8], batch.domains[1]);
    assert!(batch.rows(3..5).is_err());
}
