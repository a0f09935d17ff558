//! Tokenizers: a built-in byte-level tokenizer (vocabulary 256, id = byte value) and,
//! behind the `hf-tokenizers` feature, a Hugging Face `tokenizer.json`.
//!
//! The byte tokenizer is the default because it needs no file, round-trips every
//! UTF-8 string exactly and keeps the LM head small (V = 256) for CPU runs.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Vocabulary size of [`Tokenizer::Bytes`].
pub const BYTE_VOCAB_SIZE: usize = 256;

/// A tokenizer: text ↔ token ids.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Tokenizer {
    /// One token per UTF-8 byte; id = byte value; vocabulary 256.
    Bytes,
    /// A Hugging Face tokenizer loaded from a `tokenizer.json`.
    #[cfg(feature = "hf-tokenizers")]
    Hf {
        /// The file it was loaded from (for error messages).
        path: PathBuf,
        /// The loaded tokenizer.
        inner: Box<tokenizers::Tokenizer>,
    },
}

impl Tokenizer {
    /// The built-in byte tokenizer.
    pub fn bytes() -> Self {
        Tokenizer::Bytes
    }

    /// Loads a Hugging Face `tokenizer.json`.
    ///
    /// Without the `hf-tokenizers` feature this returns
    /// [`Error::TokenizerFeatureDisabled`] naming the file.
    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(Error::Tokenizer {
                path: path.to_path_buf(),
                reason: "file does not exist".to_string(),
            });
        }
        Self::from_existing_file(path)
    }

    #[cfg(feature = "hf-tokenizers")]
    fn from_existing_file(path: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| Error::Tokenizer {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        Ok(Tokenizer::Hf {
            path: path.to_path_buf(),
            inner: Box::new(inner),
        })
    }

    #[cfg(not(feature = "hf-tokenizers"))]
    fn from_existing_file(path: &Path) -> Result<Self> {
        Err(Error::TokenizerFeatureDisabled {
            path: PathBuf::from(path),
        })
    }

    /// Short name for logs and errors ("bytes" or "hf").
    pub fn name(&self) -> &'static str {
        match self {
            Tokenizer::Bytes => "bytes",
            #[cfg(feature = "hf-tokenizers")]
            Tokenizer::Hf { .. } => "hf",
        }
    }

    /// Vocabulary size `V`: every id returned by [`Tokenizer::encode`] is `< V`.
    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Bytes => BYTE_VOCAB_SIZE,
            #[cfg(feature = "hf-tokenizers")]
            Tokenizer::Hf { inner, .. } => inner.get_vocab_size(true),
        }
    }

    /// Text → token ids (no special tokens added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            Tokenizer::Bytes => Ok(text.bytes().map(u32::from).collect()),
            #[cfg(feature = "hf-tokenizers")]
            Tokenizer::Hf { path, inner } => inner
                .encode(text, false)
                .map(|enc| enc.get_ids().to_vec())
                .map_err(|e| Error::Tokenizer {
                    path: path.clone(),
                    reason: e.to_string(),
                }),
        }
    }

    /// Token ids → text. For the byte tokenizer, byte sequences that are not valid
    /// UTF-8 (a model may emit them) are decoded lossily with U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match self {
            Tokenizer::Bytes => {
                let mut bytes = Vec::with_capacity(ids.len());
                for &id in ids {
                    let byte = u8::try_from(id).map_err(|_| Error::TokenOutOfVocab {
                        id,
                        tokenizer: "bytes",
                        vocab_size: BYTE_VOCAB_SIZE,
                    })?;
                    bytes.push(byte);
                }
                Ok(String::from_utf8_lossy(&bytes).into_owned())
            }
            #[cfg(feature = "hf-tokenizers")]
            Tokenizer::Hf { path, inner } => {
                inner.decode(ids, false).map_err(|e| Error::Tokenizer {
                    path: path.clone(),
                    reason: e.to_string(),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_encode_gives_utf8_byte_values() {
        let t = Tokenizer::bytes();
        // "é" is U+00E9 = bytes C3 A9 in UTF-8.
        assert_eq!(t.encode("A é").unwrap(), vec![65, 32, 0xC3, 0xA9]);
        assert_eq!(t.vocab_size(), 256);
    }

    #[test]
    fn bytes_round_trip_is_exact() {
        let t = Tokenizer::bytes();
        let text = "17+25=42;\nthe cat sees ∑ 🦀";
        assert_eq!(t.decode(&t.encode(text).unwrap()).unwrap(), text);
    }

    #[test]
    fn bytes_decode_id_out_of_vocab_is_error() {
        let err = Tokenizer::bytes().decode(&[65, 300]).unwrap_err();
        assert!(
            matches!(err, Error::TokenOutOfVocab { id: 300, .. }),
            "{err}"
        );
    }

    #[test]
    fn from_file_missing_path_is_named_error() {
        let err = Tokenizer::from_file(Path::new("/nonexistent/tokenizer.json")).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/tokenizer.json"),
            "{err}"
        );
    }

    #[cfg(feature = "hf-tokenizers")]
    #[test]
    fn hf_word_level_tokenizer_json_encodes_and_decodes() {
        let dir = crate::test_dir::TestDir::new("hf_tokenizer");
        let path = dir.path().join("tokenizer.json");
        // A minimal WordLevel tokenizer in the tokenizers JSON format, written by hand.
        let json = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],
            "normalizer":null,"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,
            "decoder":null,"model":{"type":"WordLevel","vocab":{"[UNK]":0,"the":1,"cat":2,
            "sees":3,"a":4,"dog":5},"unk_token":"[UNK]"}}"#;
        std::fs::write(&path, json).unwrap();
        let t = Tokenizer::from_file(&path).unwrap();
        assert_eq!(t.name(), "hf");
        assert_eq!(t.vocab_size(), 6);
        assert_eq!(
            t.encode("the cat sees a bird").unwrap(),
            vec![1, 2, 3, 4, 0]
        );
        assert_eq!(t.decode(&[1, 5]).unwrap(), "the dog");
    }

    #[cfg(feature = "hf-tokenizers")]
    #[test]
    fn hf_malformed_tokenizer_json_is_named_error() {
        let dir = crate::test_dir::TestDir::new("hf_tokenizer_bad");
        let path = dir.path().join("tokenizer.json");
        std::fs::write(&path, "{not json").unwrap();
        let err = Tokenizer::from_file(&path).unwrap_err();
        assert!(matches!(err, Error::Tokenizer { .. }), "{err}");
        assert!(err.to_string().contains("tokenizer.json"), "{err}");
    }

    #[cfg(not(feature = "hf-tokenizers"))]
    #[test]
    fn from_file_without_feature_says_how_to_enable_it() {
        let dir = crate::test_dir::TestDir::new("hf_tokenizer_off");
        let path = dir.path().join("tokenizer.json");
        std::fs::write(&path, "{}").unwrap();
        let err = Tokenizer::from_file(&path).unwrap_err();
        assert!(err.to_string().contains("hf-tokenizers"), "{err}");
    }
}
