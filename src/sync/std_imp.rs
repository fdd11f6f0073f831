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

#![allow(missing_docs)]

use std::ops::{Deref, DerefMut};
pub use std::sync::atomic::{
    fence, AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering,
};
use std::sync::PoisonError;
use std::time::Duration;

/// A mutex with parking_lot's API over `std::sync::Mutex`.
#[derive(Debug, Default)]
pub struct Mutex<T>(std::sync::Mutex<T>);

/// Its guard (an `Option` so `Condvar::wait_for` can hand it to std and back).
#[derive(Debug)]
pub struct MutexGuard<'a, T>(Option<std::sync::MutexGuard<'a, T>>);

impl<T> Mutex<T> {
    pub const fn new(v: T) -> Mutex<T> {
        Mutex(std::sync::Mutex::new(v))
    }
    pub fn lock(&self) -> MutexGuard<'_, T> {
        MutexGuard(Some(self.0.lock().unwrap_or_else(PoisonError::into_inner)))
    }
    pub fn get_mut(&mut self) -> &mut T {
        self.0.get_mut().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<T> Deref for MutexGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.0.as_ref().expect("guard present")
    }
}

impl<T> DerefMut for MutexGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        self.0.as_mut().expect("guard present")
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
    pub fn wait_for<T>(&self, g: &mut MutexGuard<'_, T>, d: Duration) {
        let inner = g.0.take().expect("guard present");
        let (inner, _) = self
            .0
            .wait_timeout(inner, d)
            .unwrap_or_else(PoisonError::into_inner);
        g.0 = Some(inner);
    }
}

/// A reader-writer lock with parking_lot's API.
#[derive(Debug, Default)]
pub struct RwLock<T>(std::sync::RwLock<T>);
/// Read guard.
pub type RwLockReadGuard<'a, T> = std::sync::RwLockReadGuard<'a, T>;
/// Write guard.
pub type RwLockWriteGuard<'a, T> = std::sync::RwLockWriteGuard<'a, T>;

impl<T> RwLock<T> {
    pub const fn new(v: T) -> RwLock<T> {
        RwLock(std::sync::RwLock::new(v))
    }
    pub fn read(&self) -> RwLockReadGuard<'_, T> {
        self.0.read().unwrap_or_else(PoisonError::into_inner)
    }
    pub fn write(&self) -> RwLockWriteGuard<'_, T> {
        self.0.write().unwrap_or_else(PoisonError::into_inner)
    }
    pub fn get_mut(&mut self) -> &mut T {
        self.0.get_mut().unwrap_or_else(PoisonError::into_inner)
    }
}
