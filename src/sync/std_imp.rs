//! The default backend of `sync`: `std::sync`'s locks (futexes, all state in the
//! lock itself) behind parking_lot's API, which the engine is written against.
//!
//! Not parking_lot itself: its parking table is process-global, so a thread that
//! holds one of its bucket locks at a process fork leaves it held forever in the
//! child, and a fork child that starts threads (`usermm exec`'s `fork()` gives the
//! child a Vm of its own, `mm::transparent_fork`) deadlocks there (seen: every new
//! thread of the child stuck in `parking_lot_core::grow_hashtable`). No poisoning,
//! as parking_lot: a panic while holding a lock leaves the data as it is. The
//! methods are parking_lot's, documented there.
//!
//! With the feature `lockdep`, every lock carries a `lockdep::LockKey` (its
//! creation site, found with `#[track_caller]`, is its class), every acquisition
//! and release is recorded (before waiting for the lock, so a report comes before a
//! deadlock), the guards are wrappers that record their release, and a condvar wait
//! is a blocking wait. Without it the types are exactly the plain wrappers.

#![allow(missing_docs)]

use std::ops::{Deref, DerefMut};
pub use std::sync::atomic::{
    fence, AtomicBool, AtomicI32, AtomicPtr, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering,
};
use std::sync::PoisonError;
use std::time::Duration;

#[cfg(feature = "lockdep")]
use crate::lockdep::{self, Kind, LockKey};
#[cfg(feature = "lockdep")]
use std::panic::Location;

/// A mutex with parking_lot's API over `std::sync::Mutex`.
#[derive(Debug)]
pub struct Mutex<T> {
    inner: std::sync::Mutex<T>,
    #[cfg(feature = "lockdep")]
    key: LockKey,
}

/// Its guard (an `Option` so `Condvar::wait_for` can hand it to std and back).
#[derive(Debug)]
pub struct MutexGuard<'a, T> {
    inner: Option<std::sync::MutexGuard<'a, T>>,
    #[cfg(feature = "lockdep")]
    addr: usize,
}

impl<T> Mutex<T> {
    #[cfg_attr(feature = "lockdep", track_caller)]
    pub const fn new(v: T) -> Mutex<T> {
        Mutex {
            inner: std::sync::Mutex::new(v),
            #[cfg(feature = "lockdep")]
            key: LockKey::new(Location::caller()),
        }
    }
    #[cfg_attr(feature = "lockdep", track_caller)]
    pub fn lock(&self) -> MutexGuard<'_, T> {
        #[cfg(feature = "lockdep")]
        let addr = self as *const Self as usize;
        #[cfg(feature = "lockdep")]
        lockdep::acquire(
            self.key.class(),
            Kind::Sleep,
            addr,
            false,
            Location::caller(),
        );
        MutexGuard {
            inner: Some(self.inner.lock().unwrap_or_else(PoisonError::into_inner)),
            #[cfg(feature = "lockdep")]
            addr,
        }
    }
    /// Takes the lock if it is free (no wait).
    #[cfg_attr(feature = "lockdep", track_caller)]
    pub fn try_lock(&self) -> Option<MutexGuard<'_, T>> {
        let g = match self.inner.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        #[cfg(feature = "lockdep")]
        let addr = self as *const Self as usize;
        #[cfg(feature = "lockdep")]
        lockdep::acquire(
            self.key.class(),
            Kind::Sleep,
            addr,
            true,
            Location::caller(),
        );
        Some(MutexGuard {
            inner: Some(g),
            #[cfg(feature = "lockdep")]
            addr,
        })
    }
    pub fn get_mut(&mut self) -> &mut T {
        self.inner.get_mut().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<T: Default> Default for Mutex<T> {
    #[cfg_attr(feature = "lockdep", track_caller)]
    fn default() -> Mutex<T> {
        Mutex::new(T::default())
    }
}

#[cfg(feature = "lockdep")]
impl<T> lockdep::Tracked for Mutex<T> {
    fn lockdep_key(&self) -> &LockKey {
        &self.key
    }
}

#[cfg(feature = "lockdep")]
impl<T> Drop for MutexGuard<'_, T> {
    fn drop(&mut self) {
        lockdep::release(self.addr);
    }
}

impl<T> Deref for MutexGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.inner.as_ref().expect("guard present")
    }
}

impl<T> DerefMut for MutexGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        self.inner.as_mut().expect("guard present")
    }
}

/// A condition variable with parking_lot's API.
#[derive(Debug, Default)]
pub struct Condvar(std::sync::Condvar);

impl Condvar {
    pub const fn new() -> Condvar {
        Condvar(std::sync::Condvar::new())
    }
    pub fn notify_one(&self) {
        self.0.notify_one()
    }
    pub fn notify_all(&self) {
        self.0.notify_all()
    }
    #[cfg_attr(feature = "lockdep", track_caller)]
    pub fn wait_for<T>(&self, g: &mut MutexGuard<'_, T>, d: Duration) {
        // The mutex is given back and taken again inside: it stays on the held
        // stack (re-taking it under what is held adds no new order).
        #[cfg(feature = "lockdep")]
        lockdep::might_block("condvar wait");
        let inner = g.inner.take().expect("guard present");
        let (inner, _) = self
            .0
            .wait_timeout(inner, d)
            .unwrap_or_else(PoisonError::into_inner);
        g.inner = Some(inner);
    }
}

/// A reader-writer lock with parking_lot's API.
#[derive(Debug)]
pub struct RwLock<T> {
    inner: std::sync::RwLock<T>,
    #[cfg(feature = "lockdep")]
    key: LockKey,
}

/// Read guard.
#[cfg(not(feature = "lockdep"))]
pub type RwLockReadGuard<'a, T> = std::sync::RwLockReadGuard<'a, T>;
/// Write guard.
#[cfg(not(feature = "lockdep"))]
pub type RwLockWriteGuard<'a, T> = std::sync::RwLockWriteGuard<'a, T>;

impl<T> RwLock<T> {
    #[cfg_attr(feature = "lockdep", track_caller)]
    pub const fn new(v: T) -> RwLock<T> {
        RwLock {
            inner: std::sync::RwLock::new(v),
            #[cfg(feature = "lockdep")]
            key: LockKey::new(Location::caller()),
        }
    }
    /// Read and write side are one class: a reader waits behind a waiting writer
    /// (std's lock prefers writers), so either side closes a cycle.
    #[cfg_attr(feature = "lockdep", track_caller)]
    pub fn read(&self) -> RwLockReadGuard<'_, T> {
        #[cfg(feature = "lockdep")]
        let addr = self.lockdep_acquire(false);
        let g = self.inner.read().unwrap_or_else(PoisonError::into_inner);
        #[cfg(feature = "lockdep")]
        let g = RwLockReadGuard { inner: g, addr };
        g
    }
    #[cfg_attr(feature = "lockdep", track_caller)]
    pub fn write(&self) -> RwLockWriteGuard<'_, T> {
        self.write_impl(false)
    }
    /// `write` of a second lock of the class of one the caller holds, in an order
    /// the caller guarantees (fork: the parent's regions lock, then the new
    /// child's, which nobody else can reach yet). Plain `write` without `lockdep`.
    #[cfg_attr(feature = "lockdep", track_caller)]
    pub fn write_nested(&self) -> RwLockWriteGuard<'_, T> {
        self.write_impl(true)
    }
    #[cfg_attr(feature = "lockdep", track_caller)]
    fn write_impl(&self, nested: bool) -> RwLockWriteGuard<'_, T> {
        #[cfg(feature = "lockdep")]
        let addr = self.lockdep_acquire(nested);
        #[cfg(not(feature = "lockdep"))]
        let _ = nested;
        let g = self.inner.write().unwrap_or_else(PoisonError::into_inner);
        #[cfg(feature = "lockdep")]
        let g = RwLockWriteGuard { inner: g, addr };
        g
    }
    /// Records an acquisition at the caller's caller; returns the instance.
    #[cfg(feature = "lockdep")]
    #[track_caller]
    fn lockdep_acquire(&self, nested: bool) -> usize {
        let addr = self as *const Self as usize;
        let (c, site) = (self.key.class(), Location::caller());
        match nested {
            true => lockdep::acquire_nested(c, Kind::Sleep, addr, site),
            false => lockdep::acquire(c, Kind::Sleep, addr, false, site),
        }
        addr
    }
    pub fn get_mut(&mut self) -> &mut T {
        self.inner.get_mut().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<T: Default> Default for RwLock<T> {
    #[cfg_attr(feature = "lockdep", track_caller)]
    fn default() -> RwLock<T> {
        RwLock::new(T::default())
    }
}

#[cfg(feature = "lockdep")]
pub use guards::{RwLockReadGuard, RwLockWriteGuard};

/// The rwlock guards under `lockdep`: std's, plus the release record.
#[cfg(feature = "lockdep")]
mod guards {
    use super::*;

    #[cfg(feature = "lockdep")]
    impl<T> lockdep::Tracked for RwLock<T> {
        fn lockdep_key(&self) -> &LockKey {
            &self.key
        }
    }

    /// Read guard.
    #[derive(Debug)]
    pub struct RwLockReadGuard<'a, T> {
        pub(super) inner: std::sync::RwLockReadGuard<'a, T>,
        pub(super) addr: usize,
    }
    /// Write guard.
    #[derive(Debug)]
    pub struct RwLockWriteGuard<'a, T> {
        pub(super) inner: std::sync::RwLockWriteGuard<'a, T>,
        pub(super) addr: usize,
    }
    impl<T> Drop for RwLockReadGuard<'_, T> {
        fn drop(&mut self) {
            lockdep::release(self.addr);
        }
    }
    impl<T> Drop for RwLockWriteGuard<'_, T> {
        fn drop(&mut self) {
            lockdep::release(self.addr);
        }
    }
    impl<T> Deref for RwLockReadGuard<'_, T> {
        type Target = T;
        fn deref(&self) -> &T {
            &self.inner
        }
    }
    impl<T> Deref for RwLockWriteGuard<'_, T> {
        type Target = T;
        fn deref(&self) -> &T {
            &self.inner
        }
    }
    impl<T> DerefMut for RwLockWriteGuard<'_, T> {
        fn deref_mut(&mut self) -> &mut T {
            &mut self.inner
        }
    }
}
