//! The actix system the aggregator's actors (flow shards, exporter) run on: one arbiter — a
//! thread with its own event loop — per core, under a system on a thread of its own, so that the
//! tokio runtime serving gRPC and the actors never share a thread. Actors are placed on an
//! arbiter by index (shards) or round robin (agent sessions); their addresses work from any
//! thread or runtime.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use actix::{Arbiter, ArbiterHandle, System};

pub struct ActorRuntime {
    system: System,
    arbiters: Arbiters,
    thread: std::thread::JoinHandle<()>,
}

/// Arbiters to place actors on; [`Arbiters::next`] goes round robin (for per-connection actors).
#[derive(Clone)]
pub struct Arbiters {
    handles: Arc<[ArbiterHandle]>,
    next: Arc<AtomicUsize>,
}

impl Arbiters {
    fn new(handles: Vec<ArbiterHandle>) -> Self {
        Self {
            handles: handles.into(),
            next: Arc::default(),
        }
    }

    /// Just the calling thread's arbiter (inside an actix system: tests, embedding).
    pub fn current() -> Self {
        Self::new(vec![Arbiter::current()])
    }

    /// The arbiter for the `index`-th actor of a kind.
    pub fn get(&self, index: usize) -> &ArbiterHandle {
        &self.handles[index % self.handles.len()]
    }

    /// The next arbiter, round robin.
    pub fn next(&self) -> &ArbiterHandle {
        self.get(self.next.fetch_add(1, Ordering::Relaxed))
    }
}

impl ActorRuntime {
    /// Starts the system with `threads` arbiters (at least one).
    pub fn start(threads: usize) -> std::io::Result<Self> {
        let threads = threads.max(1);
        let (started, handles) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("mermin-actors".into())
            .spawn(move || {
                let system = System::new();
                system.block_on(async move {
                    let arbiters: Vec<ArbiterHandle> =
                        (0..threads).map(|_| Arbiter::new().handle()).collect();
                    let _ = started.send((System::current(), arbiters));
                });
                if let Err(err) = system.run() {
                    tracing::error!(%err, "actor system failed");
                }
            })?;
        let (system, arbiters) = handles
            .recv()
            .map_err(|_| std::io::Error::other("the actor system did not start"))?;
        Ok(Self {
            system,
            arbiters: Arbiters::new(arbiters),
            thread,
        })
    }

    pub fn arbiters(&self) -> &Arbiters {
        &self.arbiters
    }

    /// Stops every arbiter and the system, and waits for its thread.
    pub async fn stop(self) {
        self.system.stop();
        let thread = self.thread;
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    }
}
