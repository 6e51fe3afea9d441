//! Per-migration options and the convergence policy.

use std::time::Duration;

/// How a live migration behaves; every field has a sensible default.
#[derive(Debug, Clone, PartialEq)]
pub struct MigrationOptions {
    /// Switch over once the predicted downtime is at most this.
    pub downtime_max: Duration,
    /// Give up (VM keeps running on the source) after this long in pre-copy.
    pub precopy_time_max: Duration,
    /// Give up if the switchover (pause to destination ready) takes longer.
    pub switchover_time_max: Duration,
    /// Throttle the guest when rounds stop shrinking.
    pub auto_converge: bool,
    /// First throttle step, in percent of vCPU time.
    pub throttle_initial_percent: u8,
    /// Each further step adds this much.
    pub throttle_step_percent: u8,
    /// Never throttle harder than this.
    pub throttle_max_percent: u8,
    /// A round "shrank" when it had fewer than this fraction of the previous
    /// round's pages.
    pub shrink_ratio: f64,
    /// Pre-copy rounds at most (round 0 included).
    pub rounds_max: u32,
    /// Bulk streams.
    pub lanes: u32,
    /// Time the destination needs to restore state and resume the vCPUs,
    /// added to the prediction.
    pub resume_cost: Duration,
    /// Hash destination memory before resuming and compare with the source.
    pub verify_memory: bool,
    /// A stopped VM: copy memory and state, no rounds, no resume.
    pub cold: bool,
    /// Move the disks too, to this datastore on the destination, by this
    /// method (one switchover for memory and disks).
    pub storage: Option<super::wire::StorageMove>,
}

impl Default for MigrationOptions {
    fn default() -> Self {
        Self {
            downtime_max: Duration::from_millis(50),
            precopy_time_max: Duration::from_secs(120),
            switchover_time_max: Duration::from_secs(10),
            auto_converge: true,
            throttle_initial_percent: 20,
            throttle_step_percent: 10,
            throttle_max_percent: 99,
            shrink_ratio: 0.8,
            rounds_max: 1000,
            lanes: 4,
            resume_cost: Duration::from_millis(1),
            verify_memory: false,
            cold: false,
            storage: None,
        }
    }
}

impl MigrationOptions {
    /// Checks the options make sense.
    pub fn check(&self) -> Result<(), String> {
        if self.lanes == 0 || self.lanes > 64 {
            return Err(format!("lanes must be 1 to 64, not {}", self.lanes));
        }
        if self.throttle_max_percent > 99
            || self.throttle_initial_percent > self.throttle_max_percent
        {
            return Err("throttle percentages must satisfy initial <= max <= 99".into());
        }
        if !(0.0..=1.0).contains(&self.shrink_ratio) {
            return Err("shrink_ratio must lie in 0..=1".into());
        }
        if self.rounds_max == 0 {
            return Err("rounds_max must be at least 1".into());
        }
        if !self.cold && self.downtime_max < DOWNTIME_MAX_MIN {
            return Err(format!(
                "a downtime budget of {} ms cannot be met (a switchover takes time of its own): give at least {} ms",
                self.downtime_max.as_millis(),
                DOWNTIME_MAX_MIN.as_millis()
            ));
        }
        Ok(())
    }
}

/// The smallest downtime budget a live migration may be given.
pub const DOWNTIME_MAX_MIN: Duration = Duration::from_millis(1);

/// One-way trips between the pause and the guest running on the
/// destination: the switchover (state) out, the destination's readiness
/// back, the commit out.
pub const SWITCHOVER_ONE_WAY_TRIPS: u32 = 3;

/// The least downtime a link allows: the switchover's one-way trips at
/// `rtt` and the resume cost, with nothing left to send.
pub fn downtime_floor(rtt: Duration, resume_cost: Duration) -> Duration {
    rtt * SWITCHOVER_ONE_WAY_TRIPS / 2 + resume_cost
}

/// What the link and the destination are like, for a prediction.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkFigures {
    /// The least round trip seen.
    pub rtt: Duration,
    /// Share (0 to 1) of packets the connection has declared lost.
    pub loss: f64,
    /// Time to resume the guest on the destination.
    pub resume_cost: Duration,
}

/// Round trips a lost packet of the switchover costs on average: loss is
/// noticed after about one (a later packet's acknowledgement, or the
/// probe timeout for the last packet), then the copy crosses one way.
/// Measured at 150 ms round trips and 1% loss: about 1.3.
pub const LOSS_RECOVERY_ROUND_TRIPS: f64 = 1.5;

/// Smallest packet payload a QUIC path carries: the pessimistic count of
/// packets in the final burst.
const PACKET_BYTES: u64 = 1200;

/// Downtime predicted for switching over with `dirty_bytes` left to send
/// at `bandwidth_bytes_per_s`, plus `state_bytes` of device state; the
/// [`downtime_floor`] of the link; and, on a lossy link, the expected cost
/// of recovering a lost packet of the final burst or of the handshake.
pub fn predicted_downtime(
    dirty_bytes: u64,
    state_bytes: u64,
    bandwidth_bytes_per_s: f64,
    link: LinkFigures,
) -> Duration {
    let bandwidth = bandwidth_bytes_per_s.max(1.0);
    let bytes = dirty_bytes + state_bytes;
    #[allow(clippy::cast_precision_loss)] // a prediction, not an account
    let transfer = bytes as f64 / bandwidth;
    let packets = bytes.div_ceil(PACKET_BYTES) + u64::from(SWITCHOVER_ONE_WAY_TRIPS);
    let loss = link.loss.clamp(0.0, 1.0);
    #[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation)]
    let any_lost = 1.0 - (1.0 - loss).powi(packets.min(1 << 30) as i32);
    let recovery = link.rtt.as_secs_f64() * LOSS_RECOVERY_ROUND_TRIPS * any_lost;
    Duration::from_secs_f64((transfer + recovery).min(1e6))
        + downtime_floor(link.rtt, link.resume_cost)
}

/// The throttle after a round that left `dirty_pages` where the round
/// before left `previous_dirty_pages`, starting from `current` percent.
pub fn next_throttle(
    options: &MigrationOptions,
    current: u8,
    dirty_pages: u64,
    previous_dirty_pages: Option<u64>,
) -> u8 {
    if !options.auto_converge {
        return current;
    }
    let Some(previous) = previous_dirty_pages else {
        return current;
    };
    #[allow(clippy::cast_precision_loss)] // a ratio of page counts
    let shrinking = (dirty_pages as f64) < options.shrink_ratio * previous as f64;
    if shrinking {
        return current;
    }
    let next = if current == 0 {
        options.throttle_initial_percent
    } else {
        current.saturating_add(options.throttle_step_percent)
    };
    next.min(options.throttle_max_percent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prediction_adds_transfer_state_and_resume() {
        let no_wire = LinkFigures {
            rtt: Duration::ZERO,
            loss: 0.0,
            resume_cost: Duration::from_millis(1),
        };
        let d = predicted_downtime(1 << 20, 0, f64::from(1 << 30), no_wire);
        assert!(d > Duration::from_micros(1900) && d < Duration::from_micros(2100));
    }

    #[test]
    fn prediction_adds_the_switchover_round_trips_of_a_long_link() {
        // 150 ms round trips: three one-way trips of 75 ms, then the resume.
        let long = LinkFigures {
            rtt: Duration::from_millis(150),
            loss: 0.0,
            resume_cost: Duration::from_millis(1),
        };
        assert_eq!(
            downtime_floor(long.rtt, long.resume_cost),
            Duration::from_millis(226)
        );
        let d = predicted_downtime(1 << 20, 0, f64::from(1 << 30), long);
        assert!(d > Duration::from_micros(226_900) && d < Duration::from_micros(227_100));
    }

    #[test]
    fn prediction_adds_the_expected_recovery_on_a_lossy_link() {
        let lossy = LinkFigures {
            rtt: Duration::from_millis(150),
            loss: 0.01,
            resume_cost: Duration::from_millis(1),
        };
        // 1 MiB is 874 packets: one is all but sure to be lost, which
        // costs about one and a half round trips.
        let d = predicted_downtime(1 << 20, 0, f64::from(1 << 30), lossy);
        assert!(
            d > Duration::from_millis(445) && d < Duration::from_millis(452),
            "{d:?}"
        );
        // With nothing left to send only the handshake's packets may be.
        let idle = predicted_downtime(0, 0, f64::from(1 << 30), lossy);
        assert!(idle < Duration::from_millis(235), "{idle:?}");
    }

    #[test]
    fn throttle_steps_only_when_rounds_stop_shrinking() {
        let o = MigrationOptions::default();
        assert_eq!(next_throttle(&o, 0, 100, None), 0);
        assert_eq!(next_throttle(&o, 0, 50, Some(100)), 0);
        assert_eq!(next_throttle(&o, 0, 90, Some(100)), 20);
        assert_eq!(next_throttle(&o, 20, 100, Some(100)), 30);
        assert_eq!(next_throttle(&o, 95, 100, Some(100)), 99);
        let off = MigrationOptions {
            auto_converge: false,
            ..o
        };
        assert_eq!(next_throttle(&off, 0, 100, Some(100)), 0);
    }

    #[test]
    fn options_are_checked() {
        assert!(MigrationOptions::default().check().is_ok());
        let bad = MigrationOptions {
            lanes: 0,
            ..MigrationOptions::default()
        };
        assert!(bad.check().is_err());
    }
}
