//! The values a VM definition takes from outside (CLI, client protocol,
//! node files), each checked in one place: the error names the value and
//! says what is allowed.

/// The most memory one VM may have: 16 TiB.
pub const MEMORY_MIB_MAX: u64 = 16 << 20;
/// The fewest MiB a VM may have (the test guest's code and page tables
/// live in its first MiB).
pub const MEMORY_MIB_MIN: u64 = 2;
/// The most vCPUs one VM may have.
pub const VCPUS_MAX: u8 = 64;
/// The longest VM name.
pub const NAME_CHARS_MAX: usize = 64;

/// Why a value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    /// A name outside the safe set.
    #[error(
        "{what} {value:?} is not allowed: use 1 to {NAME_CHARS_MAX} letters, digits, '-', '_' or '.', starting with a letter or digit"
    )]
    Name {
        /// What kind of name.
        what: &'static str,
        /// The name given.
        value: String,
    },
    /// A number outside its range.
    #[error("{what} {value} is out of range: {allowed}")]
    Range {
        /// What it is.
        what: &'static str,
        /// The value given.
        value: u64,
        /// What is allowed.
        allowed: String,
    },
}

/// Checks a name (of a VM, a host, a datastore): it becomes a file name in
/// homes and sockets, a TOML string and a log field, so only a safe set.
pub fn check_name(what: &'static str, value: &str) -> Result<(), ValueError> {
    let safe = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    let ok = !value.is_empty()
        && value.len() <= NAME_CHARS_MAX
        && value.chars().all(safe)
        && value.starts_with(|c: char| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(ValueError::Name {
            what,
            value: value.to_owned(),
        })
    }
}

/// A VM's memory in bytes, from MiB.
pub fn memory_bytes(mib: u64) -> Result<u64, ValueError> {
    if (MEMORY_MIB_MIN..=MEMORY_MIB_MAX).contains(&mib) {
        Ok(mib << 20)
    } else {
        Err(ValueError::Range {
            what: "memory (MiB)",
            value: mib,
            allowed: format!("{MEMORY_MIB_MIN} to {MEMORY_MIB_MAX} MiB"),
        })
    }
}

/// A VM's vCPU count.
pub fn check_vcpus(vcpus: u8) -> Result<u8, ValueError> {
    if (1..=VCPUS_MAX).contains(&vcpus) {
        Ok(vcpus)
    } else {
        Err(ValueError::Range {
            what: "vCPUs",
            value: u64::from(vcpus),
            allowed: format!("1 to {VCPUS_MAX}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_outside_the_safe_set_are_refused_by_name() {
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a b",
            "a\nb",
            "q\"uote",
            "-x",
            &"x".repeat(65),
        ] {
            let e = check_name("VM name", bad).expect_err(bad);
            assert!(e.to_string().contains(&format!("{bad:?}")), "{e}");
        }
        for good in ["web-1", "db_2", "a.b", "X", &"x".repeat(64)] {
            check_name("VM name", good).expect(good);
        }
    }

    #[test]
    fn sizes_are_checked_without_wrapping() {
        // 17592186044928 MiB << 20 wraps to 512 MiB in u64.
        let e = memory_bytes(17_592_186_044_928).expect_err("wraps");
        assert!(e.to_string().contains("17592186044928"), "{e}");
        assert!(memory_bytes(1).is_err());
        assert_eq!(memory_bytes(512), Ok(512 << 20));
        assert_eq!(memory_bytes(MEMORY_MIB_MAX), Ok(MEMORY_MIB_MAX << 20));
        let e = check_vcpus(0).expect_err("zero");
        assert!(e.to_string().contains("1 to 64"), "{e}");
        assert!(check_vcpus(65).is_err());
        assert_eq!(check_vcpus(2), Ok(2));
    }
}
