//! WAL positions. PostgreSQL prints a `pg_lsn` as two 32-bit hex halves
//! (`0/16B3748`); the same form is what clients see in `tidepool.lsn` and send
//! in `SET tidepool.min_lsn`, so parsing and printing match PostgreSQL exactly.

use std::fmt;
use std::str::FromStr;

/// A byte position in the WAL stream; ordering is WAL order.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    /// `0/0`, PostgreSQL's `InvalidXLogRecPtr`: every position is at or past it.
    pub const ZERO: Lsn = Lsn(0);

    /// How many bytes of WAL `self` is behind `ahead`; 0 when it is not behind.
    pub fn bytes_behind(self, ahead: Lsn) -> u64 {
        ahead.0.saturating_sub(self.0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid LSN {0:?}: expected two hexadecimal numbers of up to 8 digits, as in 0/16B3748")]
pub struct LsnParseError(String);

impl FromStr for Lsn {
    type Err = LsnParseError;

    fn from_str(s: &str) -> Result<Lsn, LsnParseError> {
        let err = || LsnParseError(s.to_owned());
        let (high, low) = s.split_once('/').ok_or_else(err)?;
        // from_str_radix accepts a leading '+', PostgreSQL does not.
        let half = |h: &str| match (1..=8).contains(&h.len())
            && h.bytes().all(|b| b.is_ascii_hexdigit())
        {
            true => u32::from_str_radix(h, 16).map_err(|_| err()),
            false => Err(err()),
        };
        Ok(Lsn((u64::from(half(high)?) << 32) | u64::from(half(low)?)))
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_like_postgres() {
        let lsn: Lsn = "0/16B3748".parse().unwrap();
        assert_eq!(lsn, Lsn(0x16B_3748));
        assert_eq!(lsn.to_string(), "0/16B3748");
        assert_eq!("0/16b3748".parse::<Lsn>().unwrap(), lsn);
        assert_eq!("1/0".parse::<Lsn>().unwrap(), Lsn(1 << 32));
        assert_eq!(Lsn(1 << 32).to_string(), "1/0");
        assert_eq!(Lsn::ZERO.to_string(), "0/0");
        let max: Lsn = "FFFFFFFF/FFFFFFFF".parse().unwrap();
        assert_eq!(max, Lsn(u64::MAX));
        assert_eq!(max.to_string(), "FFFFFFFF/FFFFFFFF");
    }

    #[test]
    fn round_trips() {
        for value in [0, 1, 0xFFFF_FFFF, 1 << 32, 0x1234_5678_9ABC_DEF0, u64::MAX] {
            let lsn = Lsn(value);
            assert_eq!(lsn.to_string().parse::<Lsn>().unwrap(), lsn);
        }
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "",
            "/",
            "0/",
            "/0",
            "0",
            "16B3748",
            "0/16B3748/1",
            "G/0",
            "0/-1",
            "+1/0",
            " 0/1",
            "0/1 ",
            "100000000/0",
            "0/100000000",
            "0x1/0",
        ] {
            let err = bad.parse::<Lsn>().unwrap_err();
            assert!(err.to_string().contains("invalid LSN"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn bytes_behind_saturates() {
        assert_eq!(Lsn(100).bytes_behind(Lsn(150)), 50);
        assert_eq!(Lsn(150).bytes_behind(Lsn(100)), 0);
        assert_eq!(Lsn::ZERO.bytes_behind(Lsn(u64::MAX)), u64::MAX);
        assert!(Lsn(1) < Lsn(1 << 32));
    }
}
