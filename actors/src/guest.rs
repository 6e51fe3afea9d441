//! The guest backend trait (filled in by the KVM backend work).
