//! File mappings (`Share::Atomic`: failure-atomic msync). So far only the
//! write-ahead journal that makes an msync reach the file whole or not at all.

pub(crate) mod journal;
