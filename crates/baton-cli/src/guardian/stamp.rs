//! Instants as nanoseconds of `CLOCK_MONOTONIC`, for serde: the clock
//! survives an `execve` and means the same to any process on the host, so
//! timestamps can be handed to another baton or written to disk.

use std::time::Instant;

use serde::{Deserialize, Deserializer, Serializer};

pub fn serialize<S: Serializer>(at: &Instant, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(crate::sys::clock::monotonic_ns(*at))
}

pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Instant, D::Error> {
    Ok(crate::sys::clock::instant(u64::deserialize(d)?))
}

pub mod option {
    use std::time::Instant;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(at: &Option<Instant>, s: S) -> Result<S::Ok, S::Error> {
        match at {
            Some(at) => s.serialize_some(&crate::sys::clock::monotonic_ns(*at)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Instant>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(crate::sys::clock::instant))
    }
}

pub mod vec {
    use std::time::Instant;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(at: &[Instant], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(at.iter().map(|a| crate::sys::clock::monotonic_ns(*a)))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Instant>, D::Error> {
        Ok(Vec::<u64>::deserialize(d)?
            .into_iter()
            .map(crate::sys::clock::instant)
            .collect())
    }
}
