//! The shuttle backend of `sync` (built with `--cfg usermm_shuttle`): shuttle's
//! primitives behind parking_lot's API. A poisoned lock means a model thread
//! panicked; the model test fails on that panic, so the wrappers unwrap. The methods
//! are parking_lot's, documented there.

#![allow(missing_docs)]

pub use shuttle::sync::atomic::{
    fence, AtomicBool, AtomicI32, AtomicPtr, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering,
};
use std::ops::{Deref, DerefMut};
use std::time::Duration;

/// A mutex with parking_lot's API over `shuttle::sync::Mutex`.
#[derive(Debug, Default)]
pub struct Mutex<T>(shuttle::sync::Mutex<T>);

/// Its guard (an `Option` so `Condvar::wait_for` can hand it to shuttle and back).
#[derive(Debug)]
pub struct MutexGuard<'a, T>(Option<shuttle::sync::MutexGuard<'a, T>>);

impl<T> Mutex<T> {
    pub fn new(v: T) -> Mutex<T> {
        Mutex(shuttle::sync::Mutex::new(v))
    }
    pub fn lock(&self) -> MutexGuard<'_, T> {
        MutexGuard(Some(self.0.lock().unwrap()))
    }
    pub fn try_lock(&self) -> Option<MutexGuard<'_, T>> {
        self.0.try_lock().ok().map(|g| MutexGuard(Some(g)))
    }
    pub fn get_mut(&mut self) -> &mut T {
        self.0.get_mut().unwrap()
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
pub struct Condvar(shuttle::sync::Condvar);

impl Condvar {
    pub fn new() -> Condvar {
        Condvar(shuttle::sync::Condvar::new())
    }
    pub fn notify_one(&self) {
        self.0.notify_one()
    }
    pub fn notify_all(&self) {
        self.0.notify_all()
    }
    pub fn wait_for<T>(&self, g: &mut MutexGuard<'_, T>, d: Duration) {
        let inner = g.0.take().expect("guard present");
        let (inner, _) = self.0.wait_timeout(inner, d).unwrap();
        g.0 = Some(inner);
    }
}

/// A reader-writer lock with parking_lot's API.
#[derive(Debug, Default)]
pub struct RwLock<T>(shuttle::sync::RwLock<T>);
/// Read guard.
pub type RwLockReadGuard<'a, T> = shuttle::sync::RwLockReadGuard<'a, T>;
/// Write guard.
pub type RwLockWriteGuard<'a, T> = shuttle::sync::RwLockWriteGuard<'a, T>;

impl<T> RwLock<T> {
    pub fn new(v: T) -> RwLock<T> {
        RwLock(shuttle::sync::RwLock::new(v))
    }
    pub fn read(&self) -> RwLockReadGuard<'_, T> {
        self.0.read().unwrap()
    }
    pub fn write(&self) -> RwLockWriteGuard<'_, T> {
        self.0.write().unwrap()
    }
    /// `write` (the lock validator's nesting annotation is for the std backend).
    pub fn write_nested(&self) -> RwLockWriteGuard<'_, T> {
        self.0.write().unwrap()
    }
    pub fn get_mut(&mut self) -> &mut T {
        self.0.get_mut().unwrap()
    }
}
