//! The embedded default corpus: a deterministic generator of six text "domains"
//! with learnable structure, so a tiny model's loss falls far below ln(V) and
//! routed experts can specialise by domain.
//!
//! Every sample is plain ASCII and ends with a terminator, e.g.
//!
//! | domain | sample | what is learnable |
//! |---|---|---|
//! | `arithmetic` | `17+25=42;` `61-9=52;` | the result digits given the operands |
//! | `copy` | `copy dbfa>dbfa;` | the whole right side |
//! | `reverse` | `rev dbfa>afbd;` | the whole right side |
//! | `sort` | `sort 93125>12359;` | the right side (a multiset in order) |
//! | `progression` | `seq 3,7,11,15;` | every term after the second |
//! | `grammar` | `the small cat sees a dog. ` | word spelling, word order |
//!
//! A sequence holds samples of one domain only, so a sequence's domain id tags
//! every token in it.

use crate::rng::SplitMix64;

/// Names of the synthetic domains; the index is the domain id.
pub const SYNTHETIC_DOMAINS: [&str; 6] = [
    "arithmetic",
    "copy",
    "reverse",
    "sort",
    "progression",
    "grammar",
];

/// Appends one sample of domain `domain` (an index into [`SYNTHETIC_DOMAINS`]) to `out`.
pub(crate) fn push_sample(domain: usize, rng: &mut SplitMix64, out: &mut String) {
    match domain {
        0 => arithmetic(rng, out),
        1 => copy(rng, out, false),
        2 => copy(rng, out, true),
        3 => sort(rng, out),
        4 => progression(rng, out),
        _ => sentence(rng, out),
    }
}

/// `a+b=c;` with a, b < 100, or `a-b=c;` with a ≥ b.
fn arithmetic(rng: &mut SplitMix64, out: &mut String) {
    let a = rng.below(100);
    let b = rng.below(100);
    if rng.below(2) == 0 {
        out.push_str(&format!("{a}+{b}={};", a + b));
    } else {
        let (hi, lo) = if a >= b { (a, b) } else { (b, a) };
        out.push_str(&format!("{hi}-{lo}={};", hi - lo));
    }
}

/// Letters drawn from a small alphabet so copies stay short in bytes.
const LETTERS: &[u8] = b"abcdefghij";

/// `copy w>w;` or `rev w>reverse(w);` for a random word w of 3..=8 letters.
fn copy(rng: &mut SplitMix64, out: &mut String, reverse: bool) {
    let len = rng.range(3, 8);
    let word: Vec<u8> = (0..len).map(|_| rng.pick(LETTERS)).collect();
    out.push_str(if reverse { "rev " } else { "copy " });
    out.extend(word.iter().map(|&b| char::from(b)));
    out.push('>');
    if reverse {
        out.extend(word.iter().rev().map(|&b| char::from(b)));
    } else {
        out.extend(word.iter().map(|&b| char::from(b)));
    }
    out.push(';');
}

/// `sort d..>sorted(d..);` for 3..=8 random decimal digits.
fn sort(rng: &mut SplitMix64, out: &mut String) {
    let len = rng.range(3, 8);
    let mut digits: Vec<u8> = (0..len).map(|_| b'0' + rng.below(10) as u8).collect();
    out.push_str("sort ");
    out.extend(digits.iter().map(|&b| char::from(b)));
    out.push('>');
    digits.sort_unstable();
    out.extend(digits.iter().map(|&b| char::from(b)));
    out.push(';');
}

/// `seq s,s+d,s+2d,...;` with 4..=7 terms, s < 20, 1 ≤ d ≤ 9.
fn progression(rng: &mut SplitMix64, out: &mut String) {
    let start = rng.below(20);
    let step = rng.range(1, 9);
    let terms = rng.range(4, 7);
    out.push_str("seq ");
    for i in 0..terms {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&(start + i * step).to_string());
    }
    out.push(';');
}

const DETERMINERS: &[&str] = &["the", "a", "every", "one"];
const ADJECTIVES: &[&str] = &["small", "big", "red", "old", "quick", "quiet"];
const NOUNS: &[&str] = &[
    "cat", "dog", "bird", "fish", "child", "farmer", "river", "tree",
];
const VERBS: &[&str] = &["sees", "likes", "finds", "follows", "helps", "watches"];
const ADVERBS: &[&str] = &["today", "again", "slowly", "often"];

/// A sentence of the grammar S → NP V NP [Adv] "." ; NP → Det [Adj] N.
fn sentence(rng: &mut SplitMix64, out: &mut String) {
    noun_phrase(rng, out);
    out.push(' ');
    out.push_str(rng.pick(VERBS));
    out.push(' ');
    noun_phrase(rng, out);
    if rng.below(3) == 0 {
        out.push(' ');
        out.push_str(rng.pick(ADVERBS));
    }
    out.push_str(". ");
}

fn noun_phrase(rng: &mut SplitMix64, out: &mut String) {
    out.push_str(rng.pick(DETERMINERS));
    out.push(' ');
    if rng.below(2) == 0 {
        out.push_str(rng.pick(ADJECTIVES));
        out.push(' ');
    }
    out.push_str(rng.pick(NOUNS));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples(domain: usize, n: usize) -> Vec<String> {
        let mut rng = SplitMix64::new(42 + domain as u64);
        (0..n)
            .map(|_| {
                let mut s = String::new();
                push_sample(domain, &mut rng, &mut s);
                s
            })
            .collect()
    }

    #[test]
    fn arithmetic_samples_state_true_equations() {
        for s in samples(0, 500) {
            let body = s.strip_suffix(';').unwrap();
            let (lhs, rhs) = body.split_once('=').unwrap();
            let c: i64 = rhs.parse().unwrap();
            if let Some((a, b)) = lhs.split_once('+') {
                assert_eq!(
                    a.parse::<i64>().unwrap() + b.parse::<i64>().unwrap(),
                    c,
                    "{s}"
                );
            } else {
                let (a, b) = lhs.split_once('-').unwrap();
                assert_eq!(
                    a.parse::<i64>().unwrap() - b.parse::<i64>().unwrap(),
                    c,
                    "{s}"
                );
                assert!(c >= 0, "{s}");
            }
        }
    }

    #[test]
    fn copy_and_reverse_samples_copy_their_word() {
        for s in samples(1, 200) {
            let (l, r) = s
                .strip_prefix("copy ")
                .unwrap()
                .strip_suffix(';')
                .unwrap()
                .split_once('>')
                .unwrap();
            assert_eq!(l, r);
            assert!((3..=8).contains(&l.len()));
        }
        for s in samples(2, 200) {
            let (l, r) = s
                .strip_prefix("rev ")
                .unwrap()
                .strip_suffix(';')
                .unwrap()
                .split_once('>')
                .unwrap();
            assert_eq!(l.chars().rev().collect::<String>(), r);
        }
    }

    #[test]
    fn sort_samples_are_sorted_permutations() {
        for s in samples(3, 200) {
            let (l, r) = s
                .strip_prefix("sort ")
                .unwrap()
                .strip_suffix(';')
                .unwrap()
                .split_once('>')
                .unwrap();
            let mut want: Vec<char> = l.chars().collect();
            want.sort();
            assert_eq!(r.chars().collect::<Vec<_>>(), want, "{s}");
        }
    }

    #[test]
    fn progression_samples_have_constant_difference() {
        for s in samples(4, 200) {
            let terms: Vec<i64> = s
                .strip_prefix("seq ")
                .unwrap()
                .strip_suffix(';')
                .unwrap()
                .split(',')
                .map(|t| t.parse().unwrap())
                .collect();
            assert!(terms.len() >= 4);
            let d = terms[1] - terms[0];
            assert!(d >= 1);
            assert!(terms.windows(2).all(|w| w[1] - w[0] == d), "{s}");
        }
    }

    #[test]
    fn grammar_samples_use_only_the_lexicon() {
        let lexicon: Vec<&str> = [DETERMINERS, ADJECTIVES, NOUNS, VERBS, ADVERBS].concat();
        for s in samples(5, 200) {
            let body = s.strip_suffix(". ").unwrap();
            for word in body.split(' ') {
                assert!(lexicon.contains(&word), "{word} in {s}");
            }
        }
    }
}
