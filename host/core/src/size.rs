//! Sizes written by people: `16MiB`, `512 KiB`, `1.5GB`, `0B`. A unit is required, because a
//! bare number would mean bytes, and `memory = 16` meaning sixteen bytes is never what anyone
//! who wrote it meant. Config files, manifests and command-line flags all parse sizes here, so
//! every place refuses the same input with the same words.
//!
//! ```
//! use eventbroker::size::parse_size;
//! assert_eq!(parse_size("16MiB").unwrap().as_u64(), 16 * 1024 * 1024);
//! assert!(parse_size("16").unwrap_err().to_string().contains("16MiB"));
//! ```

use bytesize::ByteSize;

/// Why a size was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    /// A number without a unit.
    #[error(
        "size {0:?} has no unit: write e.g. \"{0}MiB\" or \"{0}KiB\" (or \"{0}B\" if you mean bytes)"
    )]
    NoUnit(String),
    /// Not a number followed by a unit.
    #[error(
        "{0:?} is not a size: write a number and a unit, e.g. \"16MiB\", \"512KiB\", \"1GB\", \"0B\""
    )]
    Invalid(String),
}

/// Parses a size that names its unit (`B`, `KB`/`KiB`, `MB`/`MiB`, `GB`/`GiB`, …; case and a
/// space between number and unit do not matter).
///
/// # Errors
/// [`SizeError::NoUnit`] for a bare number, [`SizeError::Invalid`] for anything else that is
/// not a number and a unit.
pub fn parse_size(text: &str) -> Result<ByteSize, SizeError> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(SizeError::Invalid(text.to_owned()));
    }
    if trimmed.parse::<f64>().is_ok() {
        return Err(SizeError::NoUnit(trimmed.to_owned()));
    }
    trimmed
        .parse::<ByteSize>()
        .map_err(|_| SizeError::Invalid(text.to_owned()))
}

/// `#[serde(with = "eventbroker::size::serde")]` for a [`ByteSize`] field: reads a string with
/// a unit (see [`parse_size`]), refuses a bare integer, writes the size back as text.
pub mod serde {
    use bytesize::ByteSize;
    use serde::de::{self, Deserializer, Visitor};
    use serde::ser::Serializer;

    struct SizeVisitor;

    impl Visitor<'_> for SizeVisitor {
        type Value = ByteSize;

        fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
            formatter.write_str("a size with a unit, such as \"16MiB\"")
        }

        fn visit_str<E: de::Error>(self, value: &str) -> Result<ByteSize, E> {
            super::parse_size(value).map_err(E::custom)
        }

        fn visit_u64<E: de::Error>(self, value: u64) -> Result<ByteSize, E> {
            Err(E::custom(super::SizeError::NoUnit(value.to_string())))
        }

        fn visit_i64<E: de::Error>(self, value: i64) -> Result<ByteSize, E> {
            Err(E::custom(super::SizeError::NoUnit(value.to_string())))
        }

        fn visit_f64<E: de::Error>(self, value: f64) -> Result<ByteSize, E> {
            Err(E::custom(super::SizeError::NoUnit(value.to_string())))
        }
    }

    /// Deserializes a size with a unit.
    ///
    /// # Errors
    /// The deserializer's error carrying [`super::SizeError`]'s message.
    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<ByteSize, D::Error> {
        deserializer.deserialize_any(SizeVisitor)
    }

    /// Serializes a size as text (`"16.0 MiB"`), which [`deserialize`] reads back.
    ///
    /// # Errors
    /// The serializer's.
    pub fn serialize<S: Serializer>(size: &ByteSize, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&size.to_string())
    }

    /// The same for an `Option<ByteSize>` field (`#[serde(default, with =
    /// "eventbroker::size::serde::option")]`).
    pub mod option {
        use bytesize::ByteSize;
        use serde::{Deserialize, Deserializer, Serializer};

        #[derive(Deserialize)]
        struct Wrapped(#[serde(with = "super")] ByteSize);

        /// Deserializes an optional size with a unit.
        ///
        /// # Errors
        /// As [`super::deserialize`].
        pub fn deserialize<'de, D: Deserializer<'de>>(
            deserializer: D,
        ) -> Result<Option<ByteSize>, D::Error> {
            Ok(Option::<Wrapped>::deserialize(deserializer)?.map(|Wrapped(size)| size))
        }

        /// Serializes an optional size as text or null.
        ///
        /// # Errors
        /// The serializer's.
        pub fn serialize<S: Serializer>(
            size: &Option<ByteSize>,
            serializer: S,
        ) -> Result<S::Ok, S::Error> {
            match size {
                Some(size) => super::serialize(size, serializer),
                None => serializer.serialize_none(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_are_required_and_understood() {
        assert_eq!(parse_size("16MiB").unwrap().as_u64(), 16 << 20);
        assert_eq!(parse_size("16 mib").unwrap().as_u64(), 16 << 20);
        assert_eq!(parse_size("1KB").unwrap().as_u64(), 1000);
        assert_eq!(parse_size("0B").unwrap().as_u64(), 0);
        assert_eq!(parse_size("7b").unwrap().as_u64(), 7);
        assert_eq!(parse_size("16"), Err(SizeError::NoUnit("16".into())));
        assert_eq!(parse_size(" 2.5 "), Err(SizeError::NoUnit("2.5".into())));
        assert!(matches!(parse_size(""), Err(SizeError::Invalid(_))));
        assert!(matches!(parse_size("lots"), Err(SizeError::Invalid(_))));
        assert!(matches!(
            parse_size("16 parsecs"),
            Err(SizeError::Invalid(_))
        ));
    }

    #[derive(Debug, ::serde::Deserialize, ::serde::Serialize)]
    struct Limits {
        #[serde(with = "super::serde")]
        memory: ByteSize,
        #[serde(default, with = "super::serde::option")]
        logs: Option<ByteSize>,
    }

    #[test]
    fn serde_refuses_bare_numbers_and_round_trips() {
        let limits: Limits = toml::from_str("memory = \"32MiB\"\nlogs = \"4KiB\"").unwrap();
        assert_eq!(limits.memory.as_u64(), 32 << 20);
        assert_eq!(limits.logs.map(|s| s.as_u64()), Some(4096));
        let error = toml::from_str::<Limits>("memory = 16")
            .unwrap_err()
            .to_string();
        assert!(error.contains("has no unit"), "{error}");
        let error = toml::from_str::<Limits>("memory = \"16\"")
            .unwrap_err()
            .to_string();
        assert!(error.contains("16MiB"), "{error}");
        let without: Limits = toml::from_str("memory = \"1B\"").unwrap();
        assert_eq!(without.logs, None);
        let text = toml::to_string(&limits).unwrap();
        let back: Limits = toml::from_str(&text).unwrap();
        assert_eq!(back.memory, limits.memory);
        assert_eq!(back.logs, limits.logs);
    }
}
