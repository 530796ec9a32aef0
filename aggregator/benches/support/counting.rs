//! A global allocator that counts live heap bytes (to measure memory per flow or per index), and
//! allocates with the system allocator, as the aggregator binary does. A bench declares
//! `#[global_allocator] static ALLOCATOR: Counting = Counting;` and reads [`live_bytes`].

use std::{
    alloc::{GlobalAlloc, Layout},
    sync::atomic::{AtomicIsize, Ordering},
};

use std::alloc::System;

pub struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: delegates to the system allocator; only adds bookkeeping.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// Heap bytes allocated and not yet freed.
pub fn live_bytes() -> isize {
    LIVE.load(Ordering::Relaxed)
}
