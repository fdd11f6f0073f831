//! Host files: their page cache (`inode`), the slots the page-I/O threads write
//! them back through (`slots`), and the journal of failure-atomic `msync`
//! (`journal`). Mappings of files live in `mm` (`Backing::File`); this module is
//! below it and knows nothing of address spaces.

pub(crate) mod inode;
pub(crate) mod slots;
