//! Faults on demand: a [`Storage`] that forwards to another one and, when told, delays or fails
//! its writes — a slow disk, a full disk — or says it is broken until a restart, for the tests
//! and chaos runs that need one. Reads always go through. It also counts the checkpoint writes
//! it was asked for.

use std::{
    collections::HashSet,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use futures_util::{FutureExt, future::BoxFuture};
use mermin_protocol::wire::read::BatchBytes;

use super::{BootId, Checkpoint, Recovered, Retirement, Storage, Store, StoreError};

/// The switches of a [`FaultyStore`], kept by the test.
#[derive(Clone, Default)]
pub struct Faults {
    write_delay_ms: Arc<AtomicU64>,
    writes_fail: Arc<AtomicBool>,
    checkpoints_panic: Arc<AtomicBool>,
    checkpoint_writes: Arc<AtomicU64>,
    broken: Arc<std::sync::OnceLock<String>>,
}

impl Faults {
    /// Every write waits this long first (the checkpoint blocks its thread, as a slow disk
    /// would; the async writes sleep).
    pub fn delay_writes(&self, delay: Duration) {
        self.write_delay_ms
            .store(delay.as_millis() as u64, Ordering::Relaxed);
    }

    /// Every write fails as on a full disk, until `false`.
    pub fn fail_writes(&self, fail: bool) {
        self.writes_fail.store(fail, Ordering::Relaxed);
    }

    /// Every checkpoint panics (a bug in the store, on its caller's thread), until `false`.
    pub fn panic_on_checkpoint(&self, panic: bool) {
        self.checkpoints_panic.store(panic, Ordering::Relaxed);
    }

    /// The store is broken until a restart, for `why` (an I/O error sled keeps for good).
    pub fn break_for_good(&self, why: &str) {
        let _ = self.broken.set(why.to_owned());
    }

    /// Calls of [`Storage::checkpoint`] so far (each may hold several shards' checkpoints).
    pub fn checkpoint_writes(&self) -> u64 {
        self.checkpoint_writes.load(Ordering::Relaxed)
    }

    fn delay(&self) -> Duration {
        Duration::from_millis(self.write_delay_ms.load(Ordering::Relaxed))
    }

    fn failure(&self) -> Result<(), StoreError> {
        if self.writes_fail.load(Ordering::Relaxed) {
            Err(StoreError::Backend(
                "No space left on device (injected)".into(),
            ))
        } else {
            Ok(())
        }
    }
}

pub struct FaultyStore {
    inner: Store,
    faults: Faults,
    failure: std::sync::Mutex<Option<String>>,
}

impl FaultyStore {
    /// `inner` with fault switches; returns the store and its switches.
    pub fn wrap(inner: Store) -> (Store, Faults) {
        let faults = Faults::default();
        let store = Arc::new(Self {
            inner,
            faults: faults.clone(),
            failure: Default::default(),
        });
        (store, faults)
    }

    /// Records an injected failure for `write_failure`, as the real store records its own.
    fn injected(&self) -> Result<(), StoreError> {
        let outcome = self.faults.failure();
        let mut failure = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        *failure = outcome.as_ref().err().map(ToString::to_string);
        outcome
    }

    async fn before_write(&self) -> Result<(), StoreError> {
        let delay = self.faults.delay();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        self.injected()
    }
}

impl Storage for FaultyStore {
    fn last_sequence(&self, boot_id: &BootId) -> Result<u64, StoreError> {
        self.inner.last_sequence(boot_id)
    }

    fn bind_agent<'a>(
        &'a self,
        boot_id: &'a BootId,
        node: &'a str,
    ) -> BoxFuture<'a, Result<Option<String>, StoreError>> {
        self.inner.bind_agent(boot_id, node)
    }

    fn retire_superseded(&self, kept: &HashSet<BootId>) -> Result<Retirement, StoreError> {
        self.inner.retire_superseded(kept)
    }

    fn append<'a>(
        &'a self,
        boot_id: &'a BootId,
        batch: &'a BatchBytes,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        async move {
            self.before_write().await?;
            self.inner.append(boot_id, batch).await
        }
        .boxed()
    }

    fn batch(&self, boot_id: &BootId, sequence: u64) -> Result<Option<BatchBytes>, StoreError> {
        self.inner.batch(boot_id, sequence)
    }

    fn batches(&self) -> Box<dyn Iterator<Item = Result<(BootId, BatchBytes), StoreError>> + '_> {
        self.inner.batches()
    }

    fn checkpoint(&self, checkpoints: &[Checkpoint<'_>]) -> Result<(), StoreError> {
        self.faults
            .checkpoint_writes
            .fetch_add(1, Ordering::Relaxed);
        std::thread::sleep(self.faults.delay());
        assert!(
            !self.faults.checkpoints_panic.load(Ordering::Relaxed),
            "checkpoint panics (injected)"
        );
        self.injected()?;
        self.inner.checkpoint(checkpoints)
    }

    fn recover(&self) -> Result<Recovered, StoreError> {
        self.inner.recover()
    }

    fn outbox_push<'a>(&'a self, request: &'a [u8]) -> BoxFuture<'a, Result<u64, StoreError>> {
        async move {
            self.before_write().await?;
            self.inner.outbox_push(request).await
        }
        .boxed()
    }

    fn outbox_oldest(&self, max: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        self.inner.outbox_oldest(max)
    }

    fn outbox_after(&self, after: u64, max: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        self.inner.outbox_after(after, max)
    }

    fn outbox_remove(&self, id: u64) -> BoxFuture<'_, Result<(), StoreError>> {
        // Removing what was delivered is not delayed: the slow store under test is the one
        // that takes new data.
        async move {
            self.injected()?;
            self.inner.outbox_remove(id).await
        }
        .boxed()
    }

    fn outbox_len(&self) -> usize {
        self.inner.outbox_len()
    }

    fn outbox_bytes(&self) -> u64 {
        self.inner.outbox_bytes()
    }

    fn write_failure(&self) -> Option<String> {
        let injected = self
            .failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        injected.or_else(|| self.inner.write_failure())
    }

    fn broken(&self) -> Option<String> {
        self.faults
            .broken
            .get()
            .cloned()
            .or_else(|| self.inner.broken())
    }
}
