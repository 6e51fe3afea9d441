//! What a migration did when: the phases each machine went through, with
//! their start and end and a few figures, kept by the sans-IO machines
//! themselves (times are offsets from the machine's start, so no clock is
//! read here).
//!
//! The same record feeds three readers: the report (`phases`), the timeline
//! chart, and the tracing spans the pumps open and close as phases begin
//! and end (`crate::node::trace`).

// rkyv derives resolver twins of the types whose fields carry no docs;
// every item written here is documented.
#![allow(missing_docs)]

use std::time::Instant;

use serde::Serialize;

/// A figure attached to a phase.
#[derive(Debug, Clone, PartialEq, Serialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[serde(untagged)]
pub enum Figure {
    /// A count.
    Count(u64),
    /// A measurement.
    Value(f64),
    /// A word (a decision, a method).
    Text(String),
}

/// One phase as it happened.
#[derive(Debug, Clone, PartialEq, Serialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct PhaseReport {
    /// What it was (`offer`, `precopy.round`, `switchover`, …).
    pub name: String,
    /// The phase it is part of (an index into the same list).
    pub parent: Option<u32>,
    /// Start, in milliseconds since the migration started.
    pub start_ms: f64,
    /// End, in milliseconds since the migration started (`None`: still on).
    pub end_ms: Option<f64>,
    /// Figures, in the order they were noted.
    pub figures: Vec<(String, Figure)>,
}

impl PhaseReport {
    /// How long it took, if it ended.
    pub fn duration_ms(&self) -> Option<f64> {
        self.end_ms.map(|e| e - self.start_ms)
    }

    /// A figure by name.
    pub fn figure(&self, name: &str) -> Option<&Figure> {
        self.figures.iter().find(|(k, _)| k == name).map(|(_, v)| v)
    }
}

/// A handle on one phase in a [`Timeline`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PhaseId(u32);

/// The phases of one machine, in the order they began.
#[derive(Debug, Clone, Default)]
pub struct Timeline {
    origin: Option<Instant>,
    phases: Vec<PhaseReport>,
}

impl Timeline {
    /// Offsets count from `now`.
    pub fn start(&mut self, now: Instant) {
        self.origin.get_or_insert(now);
    }

    /// Milliseconds since the start (0 before it).
    pub fn offset_ms(&self, now: Instant) -> f64 {
        self.origin.map_or(0.0, |o| {
            now.saturating_duration_since(o).as_secs_f64() * 1e3
        })
    }

    /// A phase begins.
    pub fn begin(&mut self, now: Instant, name: &str, parent: Option<PhaseId>) -> PhaseId {
        let id = PhaseId(u32::try_from(self.phases.len()).expect("a few hundred phases at most"));
        self.phases.push(PhaseReport {
            name: name.to_owned(),
            parent: parent.map(|p| p.0),
            start_ms: self.offset_ms(now),
            end_ms: None,
            figures: Vec::new(),
        });
        id
    }

    /// A phase that begins and ends at once (a decision).
    pub fn instant(
        &mut self,
        now: Instant,
        name: &str,
        parent: Option<PhaseId>,
        figures: Vec<(&str, Figure)>,
    ) {
        let id = self.begin(now, name, parent);
        for (k, v) in figures {
            self.note(id, k, v);
        }
        self.end(now, id);
    }

    /// A phase ends (again: ignored); its open children end with it.
    pub fn end(&mut self, now: Instant, id: PhaseId) {
        let at = self.offset_ms(now);
        let index = id.0 as usize;
        // Parents begin before their children: one pass finds them all.
        let mut inside = vec![false; self.phases.len()];
        for i in index..self.phases.len() {
            let p = &mut self.phases[i];
            inside[i] = i == index || p.parent.is_some_and(|q| inside[q as usize]);
            if inside[i] && p.end_ms.is_none() {
                p.end_ms = Some(at);
            }
        }
    }

    /// Every open phase ends.
    pub fn end_all(&mut self, now: Instant) {
        let at = self.offset_ms(now);
        for p in &mut self.phases {
            p.end_ms.get_or_insert(at);
        }
    }

    /// Notes a figure on a phase.
    pub fn note(&mut self, id: PhaseId, name: &str, value: Figure) {
        if let Some(p) = self.phases.get_mut(id.0 as usize) {
            p.figures.push((name.to_owned(), value));
        }
    }

    /// Whether a phase is still on.
    pub fn is_open(&self, id: PhaseId) -> bool {
        self.phases
            .get(id.0 as usize)
            .is_some_and(|p| p.end_ms.is_none())
    }

    /// The phases so far.
    pub fn phases(&self) -> &[PhaseReport] {
        &self.phases
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn phases_nest_and_end_with_their_parent() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut t = Timeline::default();
        t.start(t0);
        let sw = t.begin(ms(10), "switchover", None);
        let pause = t.begin(ms(10), "pause", Some(sw));
        t.end(ms(12), pause);
        let state = t.begin(ms(12), "state", Some(sw));
        t.note(state, "bytes", Figure::Count(4096));
        let other = t.begin(ms(15), "cleanup", None);
        t.end(ms(20), sw);
        t.end(ms(30), sw);
        assert!(t.is_open(other), "a later sibling is not a child");
        let p = t.phases();
        assert_eq!(p.len(), 4);
        assert_eq!(p[1].duration_ms(), Some(2.0));
        assert_eq!(p[2].end_ms, Some(20.0), "closed with its parent");
        assert_eq!(p[0].end_ms, Some(20.0), "a second end is ignored");
        assert_eq!(p[2].parent, Some(0));
        assert_eq!(p[2].figure("bytes"), Some(&Figure::Count(4096)));
        assert!(!t.is_open(sw));
    }

    #[test]
    fn end_all_closes_what_is_open() {
        let t0 = Instant::now();
        let mut t = Timeline::default();
        t.start(t0);
        let a = t.begin(t0, "offer", None);
        t.instant(
            t0,
            "convergence",
            None,
            vec![("decision", Figure::Text("switch".into()))],
        );
        assert!(t.is_open(a));
        t.end_all(t0 + Duration::from_millis(5));
        assert_eq!(t.phases()[0].end_ms, Some(5.0));
        assert_eq!(t.phases()[1].end_ms, Some(0.0));
    }
}
