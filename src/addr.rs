//! Newtypes for the engine's numbers: virtual addresses, page numbers, frame
//! numbers and swap entries. Arithmetic that can overflow is checked and returns
//! `Option`.

use std::fmt;

/// Size of a page (and of a frame and of a swap slot), in bytes.
pub const PAGE_SIZE: usize = 4096;
/// `log2(PAGE_SIZE)`.
pub const PAGE_SHIFT: u32 = 12;
/// Virtual addresses are 47 bits wide (128 TiB per address space), like x86-64 user space.
pub const VADDR_BITS: u32 = 47;
/// One past the highest valid virtual address.
pub const VADDR_END: u64 = 1 << VADDR_BITS;

/// A virtual address inside an [`AddressSpace`](crate::AddressSpace).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct VAddr(pub u64);

impl VAddr {
    /// The address as a number.
    pub const fn as_u64(self) -> u64 {
        self.0
    }
    /// `self + off`, or `None` on overflow.
    pub fn checked_add(self, off: u64) -> Option<VAddr> {
        self.0.checked_add(off).map(VAddr)
    }
    /// The virtual page number.
    pub const fn vpn(self) -> u64 {
        self.0 >> PAGE_SHIFT
    }
    /// Offset inside the page.
    pub const fn page_offset(self) -> usize {
        (self.0 & (PAGE_SIZE as u64 - 1)) as usize
    }
    /// Whether the address is page aligned.
    pub const fn is_page_aligned(self) -> bool {
        self.page_offset() == 0
    }
}

impl From<u64> for VAddr {
    fn from(v: u64) -> Self {
        VAddr(v)
    }
}

impl From<VAddr> for u64 {
    fn from(v: VAddr) -> Self {
        v.0
    }
}

impl std::ops::Add<u64> for VAddr {
    type Output = VAddr;
    /// Wrapping is never what a caller wants; an overflowing address becomes
    /// `u64::MAX`, which every call rejects as `Error::BadAddress`.
    fn add(self, rhs: u64) -> VAddr {
        VAddr(self.0.saturating_add(rhs))
    }
}

impl fmt::Debug for VAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VAddr({:#x})", self.0)
    }
}

impl fmt::Display for VAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// A frame number: index of a page-sized frame in the arena.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct Pfn(pub u32);

/// A swap entry: a device index in the swap table and a slot on it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct SwapEntry {
    /// Index of the device in the swap table (`SwapId.0`).
    pub dev: u8,
    /// Slot number on the device (page-sized units).
    pub slot: u64,
}

/// Identifies a swap device of a [`Vm`](crate::Vm), as returned by `swapon`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct SwapId(pub u8);
