//! Serde for the floats of metrics records: finite values are JSON numbers; NaN,
//! +∞ and −∞ (JSON has none of them) are the strings `"NaN"`, `"inf"` and `"-inf"`.
//! Reading also accepts `null` as NaN, which older builds wrote.

use serde::de::{self, Deserializer, Visitor};
use serde::ser::{SerializeSeq, SerializeTuple, Serializer};
use serde::{Deserialize, Serialize};

/// The JSON string written for a non-finite `v`.
fn token(v: f64) -> &'static str {
    if v.is_nan() {
        "NaN"
    } else if v > 0.0 {
        "inf"
    } else {
        "-inf"
    }
}

pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
    if v.is_finite() {
        s.serialize_f64(*v)
    } else {
        s.serialize_str(token(*v))
    }
}

pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    d.deserialize_any(Real)
}

/// One float in this encoding, for use inside containers.
#[derive(Debug, Clone, Copy)]
struct F(f64);

impl Serialize for F {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        serialize(&self.0, s)
    }
}

impl<'de> Deserialize<'de> for F {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        deserialize(d).map(F)
    }
}

struct Real;

impl Visitor<'_> for Real {
    type Value = f64;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a number, \"NaN\", \"inf\", \"-inf\" or null")
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<f64, E> {
        Ok(v)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<f64, E> {
        Ok(v as f64)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<f64, E> {
        Ok(v as f64)
    }

    fn visit_unit<E: de::Error>(self) -> Result<f64, E> {
        Ok(f64::NAN)
    }

    fn visit_none<E: de::Error>(self) -> Result<f64, E> {
        Ok(f64::NAN)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<f64, E> {
        match v {
            "NaN" => Ok(f64::NAN),
            "inf" => Ok(f64::INFINITY),
            "-inf" => Ok(f64::NEG_INFINITY),
            other => Err(E::invalid_value(de::Unexpected::Str(other), &self)),
        }
    }
}

/// `Option<f64>`: `None` is `null`, so a NaN inside `Some` is always the string.
pub mod option {
    use super::*;

    pub fn serialize<S: Serializer>(v: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(x) => super::serialize(x, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
        Ok(Option::<F>::deserialize(d)?.map(|f| f.0))
    }
}

/// `Vec<f64>`.
pub mod vec {
    use super::*;

    pub fn serialize<S: Serializer>(v: &[f64], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(v.len()))?;
        for x in v {
            seq.serialize_element(&F(*x))?;
        }
        seq.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f64>, D::Error> {
        Ok(Vec::<F>::deserialize(d)?.into_iter().map(|f| f.0).collect())
    }
}

/// `Vec<(usize, f64)>`, each pair a two-element array.
pub mod pairs {
    use super::*;

    struct Pair(usize, f64);

    impl Serialize for Pair {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let mut t = s.serialize_tuple(2)?;
            t.serialize_element(&self.0)?;
            t.serialize_element(&F(self.1))?;
            t.end()
        }
    }

    pub fn serialize<S: Serializer>(v: &[(usize, f64)], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(v.len()))?;
        for &(i, x) in v {
            seq.serialize_element(&Pair(i, x))?;
        }
        seq.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(usize, f64)>, D::Error> {
        Ok(Vec::<(usize, F)>::deserialize(d)?
            .into_iter()
            .map(|(i, f)| (i, f.0))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    #[derive(Debug, Serialize, Deserialize)]
    struct R {
        #[serde(with = "super")]
        a: f64,
        #[serde(with = "super::option")]
        b: Option<f64>,
        #[serde(with = "super::vec")]
        c: Vec<f64>,
        #[serde(with = "super::pairs")]
        d: Vec<(usize, f64)>,
    }

    #[test]
    fn non_finite_values_are_strings_and_read_back() {
        let r = R {
            a: f64::NAN,
            b: Some(f64::INFINITY),
            c: vec![1.5, f64::NEG_INFINITY],
            d: vec![(3, f64::NAN), (4, 0.25)],
        };
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(
            text,
            r#"{"a":"NaN","b":"inf","c":[1.5,"-inf"],"d":[[3,"NaN"],[4,0.25]]}"#
        );
        let back: R = serde_json::from_str(&text).unwrap();
        assert!(back.a.is_nan() && back.b == Some(f64::INFINITY));
        assert_eq!(back.c[1], f64::NEG_INFINITY);
        assert!(back.d[0].1.is_nan() && back.d[1] == (4, 0.25));
        // Older files: null for a non-finite float; integers where a float is expected.
        let old: R = serde_json::from_str(r#"{"a":null,"b":null,"c":[2],"d":[]}"#).unwrap();
        assert!(old.a.is_nan() && old.b.is_none() && old.c == [2.0]);
        let bad = serde_json::from_str::<R>(r#"{"a":"nan","b":null,"c":[],"d":[]}"#);
        assert!(bad.is_err());
    }
}
