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
    /// CPU features the host does not offer.
    #[error("CPU features {missing} are not offered by {host}; it offers: {offered}")]
    CpuFeatures {
        /// The features asked for that the host lacks.
        missing: String,
        /// The host.
        host: String,
        /// What it offers.
        offered: String,
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

/// Checks the CPU features a VM asks for against those its host offers:
/// a VM may only use what the host has (a misspelt name is no feature).
pub fn check_cpu_features<'a>(
    requested: &[String],
    offered: impl IntoIterator<Item = &'a String>,
    host: &str,
) -> Result<(), ValueError> {
    let offered: std::collections::BTreeSet<&String> = offered.into_iter().collect();
    let missing: Vec<&str> = requested
        .iter()
        .filter(|f| !offered.contains(f))
        .map(String::as_str)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(ValueError::CpuFeatures {
        missing: missing.join(","),
        host: host.to_owned(),
        offered: offered
            .into_iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join(","),
    })
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
    fn cpu_features_outside_the_host_offer_are_named() {
        let offered = ["sse2".to_owned(), "avx2".to_owned()];
        check_cpu_features(&["avx2".into()], &offered, "host-a").expect("offered");
        check_cpu_features(&[], &offered, "host-a").expect("none asked");
        let e = check_cpu_features(&["avx2".into(), "junk".into()], &offered, "host-a")
            .expect_err("junk");
        assert_eq!(
            e.to_string(),
            "CPU features junk are not offered by host-a; it offers: avx2,sse2"
        );
    }

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
