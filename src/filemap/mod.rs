//! Host files: their page cache (`inode`), the slots the page-I/O threads write
//! them back through (`slots`), and the write-ahead journal that makes an Atomic
//! mapping's `msync` reach the file whole or not at all (`journal`). Mappings of
//! files live in `mm` (`Backing::File`, `mm::msync`); this module is below it and
//! knows nothing of address spaces.

pub(crate) mod inode;
pub(crate) mod journal;
pub(crate) mod slots;
