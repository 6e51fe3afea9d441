//! What a run can break, typed: safety rules (never two, never lost) and
//! liveness (everything ends, nothing is left behind).

/// Which rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// Safety: a VM ran on two hosts at once.
    TwoHosts,
    /// Safety: a VM that no crash could have taken is on no host.
    VmLost,
    /// Safety: a disk write acknowledged to the guest is missing.
    WriteLost,
    /// Safety: destination memory differed from the source's at the
    /// switchover.
    MemoryMismatch,
    /// A production actor panicked (a bug; ractor stops the actor and the
    /// run goes on, so it would pass unseen).
    Panic,
    /// Liveness: a migration never reached an end.
    NeverEnded,
    /// Liveness: something was left half-way once settled (a shadow, a VM
    /// still marked leaving, a second copy, a stray file).
    LeftBehind,
}

impl Kind {
    /// Every kind, safety first.
    pub const ALL: [Kind; 7] = [
        Kind::TwoHosts,
        Kind::VmLost,
        Kind::WriteLost,
        Kind::MemoryMismatch,
        Kind::Panic,
        Kind::NeverEnded,
        Kind::LeftBehind,
    ];

    /// Whether breaking it loses or duplicates something (rather than
    /// leaving work undone).
    pub fn is_safety(self) -> bool {
        !matches!(self, Kind::NeverEnded | Kind::LeftBehind)
    }
}

/// One broken rule, with what was seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Which rule.
    pub kind: Kind,
    /// What happened, for the reader.
    pub detail: String,
}

impl Violation {
    /// A violation of `kind`.
    pub fn new(kind: Kind, detail: impl Into<String>) -> Self {
        Self {
            kind,
            detail: detail.into(),
        }
    }
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.detail)
    }
}
