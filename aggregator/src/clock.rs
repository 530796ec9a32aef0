//! The wall clock, read in one place: Unix time in nanoseconds. The flow table, the stitcher and
//! the metadata index never read it; their callers (shard ticks, recovery, the watchers) pass it.

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}
