//! The eBPF side as the agent sees it: loading the object, attaching the two programs to an
//! interface, the two flow tables and their swap, the overflow ring and the kernel counters.
//!
//! Exactness rests on the swap. The programs write to the table in slot 0 of `ACTIVE_FLOWS`.
//! [`FlowTables::swap_and_drain`] installs the other table; the kernel makes that update wait for
//! an RCU grace period (it does so for every map-of-maps update), and programs run inside RCU
//! read-side sections, so when the update returns no program can still be writing to the retired
//! table. It is then read and emptied at leisure. No count can slip in between read and delete.

use std::{
    collections::HashMap as StdHashMap,
    fs, io,
    os::fd::{AsFd, AsRawFd},
    path::Path,
    time::Duration,
};

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{ArrayOfMaps, HashMap, IterableMap, MapData, MapError, PerCpuArray, RingBuf},
    programs::{
        ProgramError, SchedClassifier, TcAttachType, TestRun, TestRunOptions, tc,
        tc::SchedClassifierLinkId,
    },
    util::KernelVersion,
};
use node_common::{Counter, FlowKey, FlowStats, PacketEvent, map_names, program_names};

type FlowTable = HashMap<MapData, FlowKey, FlowStats>;

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error(
        "kernel BTF not found at /sys/kernel/btf/vmlinux: Mermin needs a kernel built with CONFIG_DEBUG_INFO_BTF=y"
    )]
    NoBtf,
    #[error(
        "missing capability {capability} (needed to {purpose}); run as root or grant it to the agent"
    )]
    MissingCapability {
        capability: &'static str,
        purpose: &'static str,
    },
    #[error("reading capabilities from /proc/self/status: {0}")]
    Capabilities(String),
    #[error("loading the eBPF object: {0}")]
    Load(#[from] EbpfError),
    #[error("eBPF object has no {kind} named {name}")]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
    #[error("loading program {name}: {source}")]
    Program {
        name: &'static str,
        source: ProgramError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: MapError,
    },
    #[error("creating a kernel flow table of {entries} entries: {source}")]
    CreateTable { entries: u32, source: MapError },
    #[error("draining the retired flow table: {0}")]
    Drain(#[source] io::Error),
    #[error("attaching to interface {interface}: {source}")]
    Attach {
        interface: String,
        source: ProgramError,
    },
}

/// Everything [`load`] produces; the parts go to different threads.
pub struct Capture {
    pub programs: Programs,
    pub tables: FlowTables,
    pub overflow: RingBuf<MapData>,
    pub counters: KernelCounters,
}

/// Checks the environment, loads the object and its two programs, and installs a flow table.
/// Attaches nothing.
pub fn load(table_entries: u32) -> Result<Capture, CaptureError> {
    check_environment()?;
    // No kernel BTF for relocations: the programs use no CO-RE, and parsing vmlinux BTF would
    // double the agent's start-up memory. The object's own BTF (map definitions) still loads.
    let mut ebpf = EbpfLoader::new()
        .btf(None)
        .load(aya::include_bytes_aligned!(concat!(
            env!("OUT_DIR"),
            "/node-ebpf"
        )))?;
    for name in [program_names::INGRESS, program_names::EGRESS] {
        classifier(&mut ebpf, name)?
            .load()
            .map_err(|source| CaptureError::Program { name, source })?;
    }
    let outer = take_map(&mut ebpf, map_names::ACTIVE_FLOWS)?;
    let tables = FlowTables::new(outer, table_entries)?;
    let overflow = take_map(&mut ebpf, map_names::OVERFLOW_EVENTS)?;
    let counters = KernelCounters(take_map(&mut ebpf, map_names::COUNTERS)?);
    Ok(Capture {
        programs: Programs {
            ebpf,
            attached: StdHashMap::new(),
            tcx: KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0)),
        },
        tables,
        overflow,
        counters,
    })
}

fn classifier<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, CaptureError> {
    ebpf.program_mut(name)
        .ok_or(CaptureError::Missing {
            kind: "program",
            name,
        })?
        .try_into()
        .map_err(|source| CaptureError::Program { name, source })
}

fn take_map<M>(ebpf: &mut Ebpf, name: &'static str) -> Result<M, CaptureError>
where
    M: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(CaptureError::Missing { kind: "map", name })?;
    M::try_from(map).map_err(|source| CaptureError::Map { name, source })
}

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

fn check_environment() -> Result<(), CaptureError> {
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Err(CaptureError::NoBtf);
    }
    let caps = effective_capabilities()?;
    let has = |cap: u32| caps & (1 << cap) != 0;
    if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
        return Err(CaptureError::MissingCapability {
            capability: "CAP_BPF",
            purpose: "load eBPF programs and create maps",
        });
    }
    if !has(CAP_NET_ADMIN) {
        return Err(CaptureError::MissingCapability {
            capability: "CAP_NET_ADMIN",
            purpose: "attach TC programs to interfaces",
        });
    }
    Ok(())
}

fn effective_capabilities() -> Result<u64, CaptureError> {
    let status = fs::read_to_string("/proc/self/status")
        .map_err(|e| CaptureError::Capabilities(e.to_string()))?;
    let hex = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .ok_or_else(|| CaptureError::Capabilities("no CapEff line".into()))?;
    u64::from_str_radix(hex.trim(), 16).map_err(|e| CaptureError::Capabilities(e.to_string()))
}

/// The loaded programs and their attachments, keyed by interface index. Lives on the thread that
/// is in the target network namespace: attach resolves interface names there.
pub struct Programs {
    ebpf: Ebpf,
    attached: StdHashMap<u32, Attachment>,
    /// The kernel attaches TC programs as TCX links (>= 6.6); decided once at load.
    tcx: bool,
}

struct Attachment {
    name: String,
    ingress: SchedClassifierLinkId,
    egress: SchedClassifierLinkId,
}

impl Programs {
    /// Attaches both programs to `name` (TCX on kernels >= 6.6, a clsact qdisc before that).
    pub fn attach(&mut self, index: u32, name: &str) -> Result<(), CaptureError> {
        let attach_error = |source| CaptureError::Attach {
            interface: name.to_owned(),
            source,
        };
        if !self.tcx {
            // Already present is fine; any other failure shows up in the attach below.
            let _ = tc::qdisc_add_clsact(name);
        }
        let ingress = classifier(&mut self.ebpf, Hook::Ingress.program_name())?
            .attach(name, TcAttachType::Ingress)
            .map_err(attach_error)?;
        let egress = match classifier(&mut self.ebpf, Hook::Egress.program_name())?
            .attach(name, TcAttachType::Egress)
        {
            Ok(link) => link,
            Err(source) => {
                let _ = classifier(&mut self.ebpf, Hook::Ingress.program_name())?.detach(ingress);
                return Err(attach_error(source));
            }
        };
        self.attached.insert(
            index,
            Attachment {
                name: name.to_owned(),
                ingress,
                egress,
            },
        );
        Ok(())
    }

    /// Detaches from the interface with this index. The kernel has already dropped the links of
    /// an interface that is gone; detaching them then fails harmlessly.
    pub fn detach(&mut self, index: u32) {
        let Some(attachment) = self.attached.remove(&index) else {
            return;
        };
        for (hook, link) in [
            (Hook::Ingress, attachment.ingress),
            (Hook::Egress, attachment.egress),
        ] {
            if let Ok(program) = classifier(&mut self.ebpf, hook.program_name())
                && let Err(err) = program.detach(link)
            {
                tracing::debug!(interface = %attachment.name, %err, "detach");
            }
        }
    }

    /// Interfaces currently attached: index → name.
    pub fn attached(&self) -> impl Iterator<Item = (u32, &str)> {
        self.attached.iter().map(|(i, a)| (*i, a.name.as_str()))
    }

    /// Runs the program of `hook` `repeat` times on `frame` (an Ethernet frame) with
    /// BPF_PROG_TEST_RUN, exactly as on a real interface (the skb's interface is loopback), and
    /// returns the kernel's mean time per run. For the parser tests and the per-packet benchmark.
    pub fn test_run(
        &mut self,
        hook: Hook,
        frame: &[u8],
        repeat: u32,
    ) -> Result<Duration, CaptureError> {
        let name = hook.program_name();
        let result = classifier(&mut self.ebpf, name)?
            .test_run(TestRunOptions {
                data_in: Some(frame),
                repeat,
                ..TestRunOptions::default()
            })
            .map_err(|source| CaptureError::Program { name, source })?;
        Ok(result.duration)
    }

    pub fn detach_all(&mut self) {
        let indexes: Vec<u32> = self.attached.keys().copied().collect();
        for index in indexes {
            self.detach(index);
        }
    }
}

/// The TC hook a program runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Ingress,
    Egress,
}

impl Hook {
    fn program_name(self) -> &'static str {
        match self {
            Hook::Ingress => program_names::INGRESS,
            Hook::Egress => program_names::EGRESS,
        }
    }
}

/// The two kernel flow tables: one active, one retired and empty.
pub struct FlowTables {
    outer: ArrayOfMaps<MapData, FlowTable>,
    tables: [FlowTable; 2],
    active: usize,
    entries: u32,
    scratch: Scratch,
}

impl FlowTables {
    fn new(mut outer: ArrayOfMaps<MapData, FlowTable>, entries: u32) -> Result<Self, CaptureError> {
        let create = || {
            FlowTable::create(entries, 0)
                .map_err(|source| CaptureError::CreateTable { entries, source })
        };
        let tables = [create()?, create()?];
        outer
            .set(0, &tables[0], 0)
            .map_err(|source| CaptureError::Map {
                name: map_names::ACTIVE_FLOWS,
                source,
            })?;
        Ok(Self {
            outer,
            tables,
            active: 0,
            entries,
            scratch: Scratch::new(),
        })
    }

    /// Capacity of each table.
    pub fn entries(&self) -> u32 {
        self.entries
    }

    /// Makes the other table active, then moves every entry of the retired one into `out`.
    /// Returns the number of entries drained.
    pub fn swap_and_drain(
        &mut self,
        out: &mut Vec<(FlowKey, FlowStats)>,
    ) -> Result<usize, CaptureError> {
        let retired = self.active;
        let next = 1 - retired;
        // Waits for an RCU grace period in the kernel: see the module documentation.
        self.outer
            .set(0, &self.tables[next], 0)
            .map_err(|source| CaptureError::Map {
                name: map_names::ACTIVE_FLOWS,
                source,
            })?;
        self.active = next;
        let table = &mut self.tables[retired];
        let start = out.len();
        match lookup_and_delete_batch(table, &mut self.scratch, out) {
            Err(err) if err.raw_os_error() == Some(libc::EINVAL) => drain_one_by_one(table, out)?,
            result => result.map_err(CaptureError::Drain)?,
        }
        Ok(out.len() - start)
    }
}

/// Reusable buffers for one batch of keys and values.
struct Scratch {
    keys: Vec<FlowKey>,
    values: Vec<FlowStats>,
}

impl Scratch {
    fn new() -> Self {
        Self {
            keys: vec![FlowKey::default(); DRAIN_BATCH],
            values: vec![FlowStats::default(); DRAIN_BATCH],
        }
    }
}

/// Entries moved per BPF_MAP_LOOKUP_AND_DELETE_BATCH call. The kernel needs room for a whole hash
/// bucket in one call; buckets hold a handful of entries, so this is ample.
const DRAIN_BATCH: usize = 4096;

/// Moves every entry of a quiescent table into `out` with BPF_MAP_LOOKUP_AND_DELETE_BATCH: one
/// syscall per [`DRAIN_BATCH`] entries instead of three per entry.
fn lookup_and_delete_batch(
    table: &FlowTable,
    scratch: &mut Scratch,
    out: &mut Vec<(FlowKey, FlowStats)>,
) -> io::Result<()> {
    #[repr(C)]
    #[derive(Default)]
    struct BatchAttr {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }
    const BPF_MAP_LOOKUP_AND_DELETE_BATCH: libc::c_long = 25;

    let fd = table.map().fd().as_fd().as_raw_fd() as u32;
    let Scratch { keys, values } = scratch;
    let mut cursor: u32 = 0;
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { (&raw const cursor) as u64 },
            out_batch: (&raw mut cursor) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: DRAIN_BATCH as u32,
            map_fd: fd,
            ..BatchAttr::default()
        };
        // SAFETY: `attr` describes buffers of DRAIN_BATCH keys and values that outlive the call;
        // the kernel writes at most `count` of each and updates `count` and `cursor`.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_AND_DELETE_BATCH,
                &raw mut attr,
                size_of::<BatchAttr>(),
            )
        };
        let err = (rc < 0).then(io::Error::last_os_error);
        let moved = attr.count as usize;
        out.extend(
            keys[..moved]
                .iter()
                .copied()
                .zip(values[..moved].iter().copied()),
        );
        match err {
            None => first = false,
            // ENOENT: the walk reached the end (this call may still have moved entries).
            Some(err) if err.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
            Some(err) => return Err(err),
        }
    }
}

/// The same with per-entry syscalls, for kernels without batch operations on hash maps (< 5.6).
fn drain_one_by_one(
    table: &mut FlowTable,
    out: &mut Vec<(FlowKey, FlowStats)>,
) -> Result<(), CaptureError> {
    let map_error = |source| CaptureError::Map {
        name: "retired flow table",
        source,
    };
    let start = out.len();
    for entry in table.iter() {
        out.push(entry.map_err(map_error)?);
    }
    for (key, _) in &out[start..] {
        table.remove(key).map_err(map_error)?;
    }
    Ok(())
}

/// The per-CPU outcome counters of the programs (see [`Counter`]).
pub struct KernelCounters(PerCpuArray<MapData, u64>);

impl KernelCounters {
    /// Totals over all CPUs since load, indexed like [`Counter::ALL`].
    pub fn read(&self) -> Result<[u64; Counter::COUNT as usize], CaptureError> {
        let mut totals = [0; Counter::COUNT as usize];
        for (total, counter) in totals.iter_mut().zip(Counter::ALL) {
            let per_cpu = self
                .0
                .get(&(counter as u32), 0)
                .map_err(|source| CaptureError::Map {
                    name: map_names::COUNTERS,
                    source,
                })?;
            *total = per_cpu.iter().sum();
        }
        Ok(totals)
    }
}

/// Decodes one overflow ring record; `None` if it has the wrong size (never written by our
/// programs, but the ring is kernel memory and worth not trusting blindly).
pub fn decode_packet_event(bytes: &[u8]) -> Option<PacketEvent> {
    if bytes.len() != size_of::<PacketEvent>() {
        return None;
    }
    // SAFETY: the length matches and PacketEvent is plain old data valid for any bit pattern.
    Some(unsafe { bytes.as_ptr().cast::<PacketEvent>().read_unaligned() })
}
