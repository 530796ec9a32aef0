//! The one place where kernel timestamps become wall-clock time.
//!
//! The programs stamp packets with `CLOCK_MONOTONIC` (what `bpf_ktime_get_ns` and
//! `bpf_ktime_get_coarse_ns` read). Records carry
//! Unix time. The offset between the two clocks is re-measured every scan but only adopted when it
//! moved by more than [`STEP_THRESHOLD_NS`] (a wall-clock step, e.g. by NTP): measurement jitter
//! must not change a flow's `flow_start_unix_nanos`, which is part of its identity. Nor must a
//! step: a flow's start is converted with the offset in force when the flow began
//! ([`WallClock::unix_nanos_as_of`]), so every record of a flow carries the same start.

/// Converts kernel `CLOCK_MONOTONIC` nanoseconds to Unix nanoseconds.
#[derive(Debug, Clone)]
pub struct WallClock {
    /// Unix time minus monotonic time, in nanoseconds.
    offset_ns: i128,
    /// The offsets adopted before, oldest first, each with the kernel time it stopped being in
    /// force (at most [`STEPS_KEPT`]).
    earlier: Vec<(u64, i128)>,
}

/// Offset changes smaller than this are measurement noise, not clock steps.
pub const STEP_THRESHOLD_NS: i128 = 1_000_000;

/// Steps remembered for the starts of flows that began before them (flows older than the
/// oldest kept step take its offset).
const STEPS_KEPT: usize = 16;

impl WallClock {
    /// Re-measures and adopts the new offset only if the wall clock stepped.
    pub fn follow_steps(&mut self) {
        let measured = Self::measure();
        if (measured.offset_ns - self.offset_ns).abs() > STEP_THRESHOLD_NS {
            self.adopt(measured.offset_ns, Self::kernel_now());
        }
    }

    /// Makes `offset_ns` the offset from kernel time `at_kernel_ns` on.
    fn adopt(&mut self, offset_ns: i128, at_kernel_ns: u64) {
        if self.earlier.len() == STEPS_KEPT {
            self.earlier.remove(0);
        }
        self.earlier.push((at_kernel_ns, self.offset_ns));
        self.offset_ns = offset_ns;
    }

    /// `kernel_ns` in Unix time with the offset that was in force at that kernel time: what a
    /// flow's start is converted with, the same in every record of the flow.
    pub fn unix_nanos_as_of(&self, kernel_ns: u64) -> u64 {
        let offset = self
            .earlier
            .iter()
            .find(|(until, _)| kernel_ns < *until)
            .map_or(self.offset_ns, |(_, offset)| *offset);
        to_unix(kernel_ns, offset)
    }

    /// Measures the offset now. Reads the clocks in the order realtime, monotonic, realtime and
    /// keeps the tightest of a few tries, so a preemption between the reads cannot skew it.
    pub fn measure() -> Self {
        let mut best: Option<(i128, i128)> = None; // (window, offset)
        for _ in 0..3 {
            let before = read(libc::CLOCK_REALTIME);
            let mono = read(libc::CLOCK_MONOTONIC);
            let after = read(libc::CLOCK_REALTIME);
            let window = after - before;
            let offset = before + window / 2 - mono;
            if best.is_none_or(|(w, _)| window < w) {
                best = Some((window, offset));
            }
        }
        let (_, offset_ns) = best.unwrap_or_default();
        Self::with_offset(offset_ns)
    }

    /// A clock with a fixed offset (tests).
    pub fn with_offset(offset_ns: i128) -> Self {
        Self {
            offset_ns,
            earlier: Vec::new(),
        }
    }

    /// `kernel_ns` in Unix time with the current offset.
    pub fn unix_nanos(&self, kernel_ns: u64) -> u64 {
        to_unix(kernel_ns, self.offset_ns)
    }

    /// The kernel clock the programs use (`CLOCK_MONOTONIC`), now, in nanoseconds.
    pub fn kernel_now() -> u64 {
        u64::try_from(read(libc::CLOCK_MONOTONIC)).unwrap_or(0)
    }
}

fn to_unix(kernel_ns: u64, offset_ns: i128) -> u64 {
    u64::try_from(i128::from(kernel_ns) + offset_ns).unwrap_or(0)
}

fn read(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; both clock ids exist on every supported kernel.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_time_maps_close_to_system_time() {
        let clock = WallClock::measure();
        let unix = clock.unix_nanos(WallClock::kernel_now());
        let system = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        assert!(unix.abs_diff(system) < 50_000_000, "{unix} vs {system}");
    }

    #[test]
    fn jitter_is_ignored_but_steps_are_followed() {
        let measured = WallClock::measure();
        let mut clock = WallClock::with_offset(measured.offset_ns + 1_000);
        clock.follow_steps();
        assert_eq!(clock.offset_ns, measured.offset_ns + 1_000);
        let mut stepped = WallClock::with_offset(measured.offset_ns - 5_000_000_000);
        stepped.follow_steps();
        assert!((stepped.offset_ns - measured.offset_ns).abs() < STEP_THRESHOLD_NS);
    }

    #[test]
    fn a_flow_s_start_keeps_the_offset_in_force_when_it_began() {
        let mut clock = WallClock::with_offset(1_000);
        clock.adopt(5_000_000, 100);
        // Began before the step: as it was reported before it.
        assert_eq!(clock.unix_nanos_as_of(50), 1_050);
        assert_eq!(clock.unix_nanos_as_of(150), 5_000_150);
        assert_eq!(clock.unix_nanos(50), 5_000_050);
        // Only the last STEPS_KEPT steps are remembered; older flows take the oldest kept.
        for step in 1..=STEPS_KEPT as u64 {
            clock.adopt(5_000_000 + step as i128, 100 + step);
        }
        assert_eq!(clock.earlier.len(), STEPS_KEPT);
        assert_eq!(clock.unix_nanos_as_of(50), 5_000_050);
    }

    #[test]
    fn fixed_offset_is_exact() {
        assert_eq!(WallClock::with_offset(1_000).unix_nanos(5), 1_005);
        assert_eq!(WallClock::with_offset(-10).unix_nanos(5), 0);
    }
}
