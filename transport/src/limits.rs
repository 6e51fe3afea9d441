//! Hard limits on everything that crosses the wire.
//!
//! Every length read from a peer is checked against one of these before a
//! byte of the body is buffered, so a hostile or broken peer cannot make a
//! node allocate without bound.

/// Size of one guest page. Page batches only carry whole pages.
pub const PAGE_BYTES: usize = 4096;

/// Largest frame body of any kind.
pub const FRAME_BODY_BYTES_MAX: usize = 16 * 1024 * 1024 + 64 * 1024;

/// Largest control message body (offers, replies, reports).
pub const CONTROL_BODY_BYTES_MAX: usize = 1024 * 1024;

/// Largest number of entries (pages or extents) in one batch.
pub const BATCH_ENTRIES_MAX: usize = 4096;

/// Largest payload (non-zero data) of one batch: 4096 pages of 4 KiB.
pub const BATCH_DATA_BYTES_MAX: usize = 16 * 1024 * 1024;

/// Largest encoded batch header (the rkyv archive of the entry table).
pub const BATCH_HEADER_BYTES_MAX: usize = 64 * 1024;

/// Largest single extent in an extent batch.
pub const EXTENT_BYTES_MAX: usize = 4 * 1024 * 1024;
