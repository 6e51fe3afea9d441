//! CPU time of this process's threads, read from `/proc/self/task`, so a
//! benchmark can count what the migration itself cost and leave out the
//! guest's vCPU threads (they belong to the workload) and the delay relay
//! (it stands for the network).

use std::collections::HashMap;

/// Thread-name prefixes that are not the migration's own work.
const NOT_MIGRATION: [&str; 2] = ["vcpu", "ferry-relay"];

/// CPU seconds per live thread (id → name, seconds) at one moment.
#[derive(Debug, Clone, Default)]
pub struct ThreadCpu(HashMap<u32, (String, f64)>);

impl ThreadCpu {
    /// Reads every live thread's user + system time.
    pub fn sample() -> Self {
        // SAFETY: no arguments; returns a positive tick rate or -1.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let mut threads = HashMap::new();
        let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
            return Self(threads);
        };
        for entry in dir.flatten() {
            let Some(tid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
                continue;
            };
            if let Some(t) = std::fs::read_to_string(entry.path().join("stat"))
                .ok()
                .and_then(|stat| parse_stat(&stat, ticks))
            {
                threads.insert(tid, t);
            }
        }
        Self(threads)
    }

    /// CPU seconds the migration's threads used between `before` and
    /// `self` (threads born since count from zero).
    pub fn migration_since(&self, before: &ThreadCpu) -> f64 {
        self.0
            .iter()
            .filter(|(_, (name, _))| !NOT_MIGRATION.iter().any(|p| name.starts_with(p)))
            .map(|(tid, (_, now))| now - before.0.get(tid).map_or(0.0, |(_, s)| *s))
            .sum()
    }
}

/// (name, user + system seconds) from one `/proc/.../stat` line.
fn parse_stat(stat: &str, ticks_per_s: f64) -> Option<(String, f64)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let name = stat.get(open + 1..close)?.to_owned();
    // Fields after the name start at field 3 (state); utime and stime are
    // fields 14 and 15.
    let rest: Vec<&str> = stat.get(close + 1..)?.split_whitespace().collect();
    let utime: f64 = rest.get(11)?.parse().ok()?;
    let stime: f64 = rest.get(12)?.parse().ok()?;
    Some((name, (utime + stime) / ticks_per_s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stat_line_gives_its_name_and_seconds() {
        let line = "4242 (tokio worker) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 1 0";
        assert_eq!(
            parse_stat(line, 100.0),
            Some(("tokio worker".to_owned(), 3.0))
        );
        assert_eq!(parse_stat("4242 (x", 100.0), None);
    }

    #[test]
    fn vcpu_threads_are_left_out_of_the_migration() {
        let before = ThreadCpu(HashMap::from([
            (1, ("tokio-runtime-w".to_owned(), 1.0)),
            (2, ("vcpu0".to_owned(), 5.0)),
        ]));
        let after = ThreadCpu(HashMap::from([
            (1, ("tokio-runtime-w".to_owned(), 3.5)),
            (2, ("vcpu0".to_owned(), 9.0)),
            (3, ("ferry-relay".to_owned(), 2.0)),
            (4, ("tokio-runtime-w".to_owned(), 0.5)),
        ]));
        assert!((after.migration_since(&before) - 3.0).abs() < 1e-9);
    }
}
