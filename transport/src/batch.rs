//! Page and extent batches: the bulk data of a migration.
//!
//! A batch body is laid out so the receiver can validate a small table first
//! and then copy data straight into its destination:
//!
//! ```text
//! +-------------------+---------------------------+---------------------+
//! | table length (LE) | rkyv archive of the table | data of the non-zero|
//! | u32               | (BatchTable)              | entries, in order   |
//! +-------------------+---------------------------+---------------------+
//! ```
//!
//! Each table entry names an address (a guest frame number for pages, a byte
//! offset for extents), a length, and whether the entry is all zeroes. Zero
//! entries carry no data. The receiver checks the whole table (entry count,
//! lengths, ordering, total data length against the frame) before it reads a
//! data byte, then copies each entry's data once, from the received buffer
//! into the slot its [`BatchSink`] gives it.
//!
//! The sender copies each page once, into the batch's data buffer; the table
//! goes out as a second chunk so the data never moves again.

use bytes::{BufMut, Bytes, BytesMut};

use crate::frame::{FRAME_HEADER_BYTES, FrameHeader, FrameKind};
use crate::limits::{
    BATCH_DATA_BYTES_MAX, BATCH_ENTRIES_MAX, BATCH_HEADER_BYTES_MAX, EXTENT_BYTES_MAX, PAGE_BYTES,
};
use crate::pool::BufferPool;

/// One entry of a batch table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct BatchEntry {
    /// Guest frame number (page batches) or byte offset (extent batches).
    pub addr: u64,
    /// Bytes covered by the entry: `PAGE_BYTES` for pages.
    pub len: u32,
    /// The entry is all zeroes and carries no data.
    pub zero: bool,
}

/// The table at the front of a batch body.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct BatchTable {
    /// Entries in data order.
    pub entries: Vec<BatchEntry>,
}

/// Which kind of batch, and so which rules its table follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchKind {
    /// Guest pages: every entry is one page, `addr` a frame number.
    Pages,
    /// Disk extents: `addr` a byte offset, `len` up to `EXTENT_BYTES_MAX`.
    Extents,
}

impl BatchKind {
    /// The frame kind that carries this batch kind.
    pub fn frame_kind(self) -> FrameKind {
        match self {
            Self::Pages => FrameKind::PageBatch,
            Self::Extents => FrameKind::ExtentBatch,
        }
    }
}

/// Why a batch was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BatchError {
    /// The body is shorter than its own table says.
    #[error("batch body of {body} bytes is truncated: needs {needed}")]
    Truncated {
        /// Body length.
        body: usize,
        /// Length the table implies.
        needed: usize,
    },
    /// The table length exceeds its limit.
    #[error("batch table of {0} bytes exceeds the limit of {BATCH_HEADER_BYTES_MAX}")]
    TableTooLong(usize),
    /// The table is not a valid archive.
    #[error("invalid batch table archive: {0}")]
    InvalidTable(String),
    /// Too many entries.
    #[error("batch of {0} entries exceeds the limit of {BATCH_ENTRIES_MAX}")]
    TooManyEntries(usize),
    /// An entry's length breaks the batch kind's rules.
    #[error("entry {index} at {addr:#x} has bad length {len}")]
    BadEntryLength {
        /// Entry index.
        index: usize,
        /// Entry address.
        addr: u64,
        /// Entry length.
        len: u32,
    },
    /// The data section's length does not match the table.
    #[error("batch data is {actual} bytes but its table describes {expected}")]
    DataLengthMismatch {
        /// Bytes present after the table.
        actual: usize,
        /// Bytes the non-zero entries add up to.
        expected: usize,
    },
    /// The sink refused an entry (for example a frame number beyond guest memory).
    #[error("entry {index} at {addr:#x}+{len} refused: {reason}")]
    Refused {
        /// Entry index.
        index: usize,
        /// Entry address.
        addr: u64,
        /// Entry length.
        len: u32,
        /// The sink's reason.
        reason: String,
    },
}

/// Where a received batch's entries go: guest memory or a disk file.
pub trait BatchSink {
    /// The writable slot for `len` bytes at `addr`; an error refuses the
    /// batch (for example when `addr` lies outside guest memory).
    fn slot(&mut self, addr: u64, len: usize) -> Result<&mut [u8], String>;
    /// Records that `len` bytes at `addr` are zero.
    fn zero(&mut self, addr: u64, len: usize) -> Result<(), String>;
}

/// True when every byte of `data` is zero.
///
/// Reads eight bytes at a time: on a 4 KiB page that runs at memory speed,
/// which matters because every page of every round passes through here.
pub fn is_zero(data: &[u8]) -> bool {
    let (chunks, rest) = data.as_chunks::<8>();
    chunks.iter().all(|c| u64::from_ne_bytes(*c) == 0) && rest.iter().all(|b| *b == 0)
}

/// An encoded batch ready to send: the frame header and table, then the data.
#[derive(Debug, Clone)]
pub struct EncodedBatch {
    /// Frame header, table length and table.
    pub head: Bytes,
    /// Data of the non-zero entries.
    pub data: Bytes,
}

impl EncodedBatch {
    /// Total bytes on the wire.
    pub fn wire_len(&self) -> usize {
        self.head.len() + self.data.len()
    }

    /// The whole frame in one buffer (copies; for tests and the in-memory paths).
    pub fn to_contiguous(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(self.wire_len());
        out.put_slice(&self.head);
        out.put_slice(&self.data);
        out.freeze()
    }
}

/// Builds one batch. Data is copied once, when an entry is pushed, into a
/// buffer from a [`BufferPool`] that goes to the transport as is.
#[derive(Debug)]
pub struct BatchBuilder {
    kind: BatchKind,
    entries: Vec<BatchEntry>,
    data: Vec<u8>,
    pool: BufferPool,
    zero_entries: usize,
}

impl BatchBuilder {
    /// An empty builder for `kind` with a private pool of full-size buffers.
    pub fn new(kind: BatchKind) -> Self {
        Self::with_pool(kind, BufferPool::new(BATCH_DATA_BYTES_MAX, 4))
    }

    /// An empty builder whose data buffers come from `pool`; a batch then
    /// holds at most `pool.buf_bytes()` of data.
    pub fn with_pool(kind: BatchKind, pool: BufferPool) -> Self {
        Self {
            kind,
            entries: Vec::new(),
            data: Vec::new(),
            pool,
            zero_entries: 0,
        }
    }

    /// Entries pushed so far.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no entry was pushed yet.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Data bytes pushed so far.
    pub fn data_len(&self) -> usize {
        self.data.len()
    }

    /// Zero entries pushed so far.
    pub fn zero_entries(&self) -> usize {
        self.zero_entries
    }

    /// Whether one more entry of `len` data bytes still fits.
    pub fn has_room_for(&self, len: usize) -> bool {
        self.entries.len() < BATCH_ENTRIES_MAX
            && self.data.len() + len <= BATCH_DATA_BYTES_MAX.min(self.pool.buf_bytes())
    }

    /// Adds a guest page, sent as a zero flag if it is all zeroes.
    ///
    /// # Panics
    /// On an extent builder, a page that is not `PAGE_BYTES` long, or a full
    /// batch: all are bugs in the caller.
    pub fn push_page(&mut self, gfn: u64, page: &[u8]) {
        assert_eq!(self.kind, BatchKind::Pages, "push_page on an extent batch");
        assert_eq!(page.len(), PAGE_BYTES, "page of {} bytes", page.len());
        self.push(gfn, page);
    }

    /// Adds page `gfn` by letting `fill` write it straight into the batch
    /// buffer (so a page read from guest memory is copied once), then
    /// flags it zero, dropping its data, if `fill` wrote only zeroes.
    /// Returns whether the page was zero; on `fill`'s error nothing is added.
    ///
    /// # Panics
    /// On an extent builder or a full batch.
    pub fn push_page_with<E>(
        &mut self,
        gfn: u64,
        fill: impl FnOnce(&mut [u8]) -> Result<(), E>,
    ) -> Result<bool, E> {
        self.fill_page(gfn, fill, true)
    }

    /// As [`Self::push_page_with`], but a zero page is left out entirely
    /// (for a receiver whose memory starts zeroed, as on the first round of
    /// a migration). Returns whether the page was zero.
    ///
    /// # Panics
    /// On an extent builder or a full batch.
    pub fn push_nonzero_page_with<E>(
        &mut self,
        gfn: u64,
        fill: impl FnOnce(&mut [u8]) -> Result<(), E>,
    ) -> Result<bool, E> {
        self.fill_page(gfn, fill, false)
    }

    fn fill_page<E>(
        &mut self,
        gfn: u64,
        fill: impl FnOnce(&mut [u8]) -> Result<(), E>,
        keep_zero: bool,
    ) -> Result<bool, E> {
        assert_eq!(
            self.kind,
            BatchKind::Pages,
            "push_page_with on an extent batch"
        );
        assert!(self.has_room_for(PAGE_BYTES), "batch is full");
        if self.data.capacity() == 0 {
            self.data = self.pool.take();
        }
        let at = self.data.len();
        self.data.resize(at + PAGE_BYTES, 0);
        if let Err(e) = fill(&mut self.data[at..]) {
            self.data.truncate(at);
            return Err(e);
        }
        let zero = is_zero(&self.data[at..]);
        if zero {
            self.data.truncate(at);
            if !keep_zero {
                return Ok(true);
            }
        }
        self.push_entry(gfn, PAGE_BYTES, zero);
        Ok(zero)
    }

    /// Adds a disk extent, sent as a zero flag if it is all zeroes.
    ///
    /// # Panics
    /// On a page builder, an empty or oversized extent, or a full batch.
    pub fn push_extent(&mut self, offset: u64, data: &[u8]) {
        assert_eq!(self.kind, BatchKind::Extents, "push_extent on a page batch");
        assert!(!data.is_empty() && data.len() <= EXTENT_BYTES_MAX);
        self.push(offset, data);
    }

    /// Adds an extent known to be zero without reading it.
    pub fn push_zero_extent(&mut self, offset: u64, len: usize) {
        assert_eq!(self.kind, BatchKind::Extents);
        assert!(len > 0 && len <= EXTENT_BYTES_MAX);
        self.push_entry(offset, len, true);
    }

    fn push(&mut self, addr: u64, data: &[u8]) {
        if is_zero(data) {
            self.push_entry(addr, data.len(), true);
        } else {
            assert!(self.has_room_for(data.len()), "batch is full");
            if self.data.capacity() == 0 {
                self.data = self.pool.take();
            }
            self.data.extend_from_slice(data);
            self.push_entry(addr, data.len(), false);
        }
    }

    fn push_entry(&mut self, addr: u64, len: usize, zero: bool) {
        assert!(self.entries.len() < BATCH_ENTRIES_MAX, "batch is full");
        let len = u32::try_from(len).expect("entry length checked against limit");
        self.zero_entries += usize::from(zero);
        self.entries.push(BatchEntry { addr, len, zero });
    }

    /// Encodes the batch and leaves the builder empty for the next one.
    pub fn finish(&mut self) -> EncodedBatch {
        let table = BatchTable {
            entries: std::mem::take(&mut self.entries),
        };
        self.zero_entries = 0;
        let archive =
            rkyv::to_bytes::<rkyv::rancor::Error>(&table).expect("a batch table always encodes");
        assert!(archive.len() <= BATCH_HEADER_BYTES_MAX);
        let data = match std::mem::take(&mut self.data) {
            buf if buf.is_empty() => Bytes::new(),
            buf => self.pool.freeze(buf),
        };
        let body_len = 4 + archive.len() + data.len();
        let mut head = BytesMut::with_capacity(FRAME_HEADER_BYTES + 4 + archive.len());
        head.put_slice(&FrameHeader::new(self.kind.frame_kind(), body_len).encode());
        head.put_u32_le(u32::try_from(archive.len()).expect("table length within limit"));
        head.put_slice(&archive);
        EncodedBatch {
            head: head.freeze(),
            data,
        }
    }
}

/// A validated batch table, ready to route data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedTable {
    /// Entries, each checked against the batch kind's rules.
    pub entries: Vec<BatchEntry>,
    /// Sum of the non-zero entries' lengths.
    pub data_len: usize,
}

/// Validates a table archive for a batch of `kind`.
pub fn check_table(kind: BatchKind, table: &[u8]) -> Result<CheckedTable, BatchError> {
    if table.len() > BATCH_HEADER_BYTES_MAX {
        return Err(BatchError::TableTooLong(table.len()));
    }
    let archived = rkyv::access::<ArchivedBatchTable, rkyv::rancor::Error>(table)
        .map_err(|e| BatchError::InvalidTable(e.to_string()))?;
    if archived.entries.len() > BATCH_ENTRIES_MAX {
        return Err(BatchError::TooManyEntries(archived.entries.len()));
    }
    let mut entries = Vec::with_capacity(archived.entries.len());
    let mut data_len = 0usize;
    for (index, e) in archived.entries.iter().enumerate() {
        let entry = BatchEntry {
            addr: e.addr.to_native(),
            len: e.len.to_native(),
            zero: e.zero,
        };
        let len = entry.len as usize;
        let ok = match kind {
            BatchKind::Pages => len == PAGE_BYTES,
            BatchKind::Extents => len > 0 && len <= EXTENT_BYTES_MAX,
        };
        if !ok {
            return Err(BatchError::BadEntryLength {
                index,
                addr: entry.addr,
                len: entry.len,
            });
        }
        if !entry.zero {
            data_len += len;
        }
        entries.push(entry);
    }
    if data_len > BATCH_DATA_BYTES_MAX {
        return Err(BatchError::DataLengthMismatch {
            actual: BATCH_DATA_BYTES_MAX,
            expected: data_len,
        });
    }
    Ok(CheckedTable { entries, data_len })
}

/// Splits a complete batch body into its checked table and data section.
pub fn parse_body(kind: BatchKind, body: &[u8]) -> Result<(CheckedTable, &[u8]), BatchError> {
    let Some((len_bytes, rest)) = body.split_first_chunk::<4>() else {
        return Err(BatchError::Truncated {
            body: body.len(),
            needed: 4,
        });
    };
    let table_len = u32::from_le_bytes(*len_bytes) as usize;
    if table_len > BATCH_HEADER_BYTES_MAX {
        return Err(BatchError::TableTooLong(table_len));
    }
    if rest.len() < table_len {
        return Err(BatchError::Truncated {
            body: body.len(),
            needed: 4 + table_len,
        });
    }
    let (table, data) = rest.split_at(table_len);
    let checked = check_table(kind, table)?;
    if data.len() != checked.data_len {
        return Err(BatchError::DataLengthMismatch {
            actual: data.len(),
            expected: checked.data_len,
        });
    }
    Ok((checked, data))
}

/// Copies a batch's data from `data` (the section after the table) into `sink`.
pub fn apply(
    table: &CheckedTable,
    data: &[u8],
    sink: &mut dyn BatchSink,
) -> Result<(), BatchError> {
    let mut at = 0usize;
    for (index, e) in table.entries.iter().enumerate() {
        let len = e.len as usize;
        let refused = |reason| BatchError::Refused {
            index,
            addr: e.addr,
            len: e.len,
            reason,
        };
        if e.zero {
            sink.zero(e.addr, len).map_err(refused)?;
        } else {
            let slot = sink.slot(e.addr, len).map_err(refused)?;
            slot.copy_from_slice(&data[at..at + len]);
            at += len;
        }
    }
    Ok(())
}

/// A [`BatchSink`] over a flat byte slice (guest memory or a test buffer):
/// page `gfn` lives at `gfn * PAGE_BYTES`, extent `offset` at `offset`.
#[derive(Debug)]
pub struct SliceSink<'a> {
    memory: &'a mut [u8],
    unit: u64,
    /// Entries written with data.
    pub data_entries: usize,
    /// Entries recorded as zero.
    pub zero_entries: usize,
}

impl<'a> SliceSink<'a> {
    /// Pages into `memory`.
    pub fn pages(memory: &'a mut [u8]) -> Self {
        Self {
            memory,
            unit: PAGE_BYTES as u64,
            data_entries: 0,
            zero_entries: 0,
        }
    }

    /// Extents into `memory`.
    pub fn extents(memory: &'a mut [u8]) -> Self {
        Self {
            memory,
            unit: 1,
            data_entries: 0,
            zero_entries: 0,
        }
    }

    fn range(&self, addr: u64, len: usize) -> Result<std::ops::Range<usize>, String> {
        let start = addr
            .checked_mul(self.unit)
            .and_then(|s| usize::try_from(s).ok())
            .ok_or_else(|| format!("address {addr:#x} overflows"))?;
        let end = start
            .checked_add(len)
            .filter(|end| *end <= self.memory.len())
            .ok_or_else(|| format!("beyond the {} bytes of the target", self.memory.len()))?;
        Ok(start..end)
    }
}

impl BatchSink for SliceSink<'_> {
    fn slot(&mut self, addr: u64, len: usize) -> Result<&mut [u8], String> {
        let range = self.range(addr, len)?;
        self.data_entries += 1;
        Ok(&mut self.memory[range])
    }

    fn zero(&mut self, addr: u64, len: usize) -> Result<(), String> {
        let range = self.range(addr, len)?;
        self.zero_entries += 1;
        self.memory[range].fill(0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonzero_push_leaves_zero_pages_out() {
        let mut b = BatchBuilder::new(BatchKind::Pages);
        let zero = b
            .push_nonzero_page_with(1, |p| {
                p.fill(0);
                Ok::<(), ()>(())
            })
            .expect("fill");
        assert!(zero && b.is_empty());
        b.push_nonzero_page_with(2, |p| {
            p.fill(9);
            Ok::<(), ()>(())
        })
        .expect("fill");
        assert_eq!((b.len(), b.data_len()), (1, PAGE_BYTES));
    }

    fn page(fill: u8) -> Vec<u8> {
        vec![fill; PAGE_BYTES]
    }

    fn body_of(batch: &EncodedBatch) -> Bytes {
        batch.to_contiguous().slice(FRAME_HEADER_BYTES..)
    }

    #[test]
    fn pages_round_trip_with_zero_pages_flagged() {
        let mut b = BatchBuilder::new(BatchKind::Pages);
        b.push_page(0, &page(1));
        b.push_page(2, &page(0));
        b.push_page(3, &page(9));
        let batch = b.finish();
        assert_eq!(
            batch.data.len(),
            2 * PAGE_BYTES,
            "zero page carries no data"
        );
        let body = body_of(&batch);
        let (table, data) = parse_body(BatchKind::Pages, &body).expect("parse");
        let mut memory = vec![0xAAu8; 4 * PAGE_BYTES];
        let mut sink = SliceSink::pages(&mut memory);
        apply(&table, data, &mut sink).expect("apply");
        assert_eq!((sink.data_entries, sink.zero_entries), (2, 1));
        assert!(memory[..PAGE_BYTES].iter().all(|b| *b == 1));
        assert!(
            memory[PAGE_BYTES..2 * PAGE_BYTES]
                .iter()
                .all(|b| *b == 0xAA)
        );
        assert!(
            memory[2 * PAGE_BYTES..3 * PAGE_BYTES]
                .iter()
                .all(|b| *b == 0)
        );
        assert!(memory[3 * PAGE_BYTES..].iter().all(|b| *b == 9));
    }

    #[test]
    fn filled_pages_encode_like_pushed_pages() {
        let mut pushed = BatchBuilder::new(BatchKind::Pages);
        let mut filled = BatchBuilder::new(BatchKind::Pages);
        for (gfn, fill) in [(0u64, 3u8), (1, 0), (7, 9)] {
            pushed.push_page(gfn, &page(fill));
            let zero = filled
                .push_page_with(gfn, |dst| {
                    dst.fill(fill);
                    Ok::<_, ()>(())
                })
                .expect("fill");
            assert_eq!(zero, fill == 0);
        }
        let failed = filled.push_page_with(8, |dst| {
            dst.fill(1);
            Err("guest gone")
        });
        assert_eq!(failed, Err("guest gone"));
        assert_eq!(filled.len(), 3, "a failed fill adds nothing");
        assert_eq!(
            pushed.finish().to_contiguous(),
            filled.finish().to_contiguous()
        );
    }

    #[test]
    fn frame_number_beyond_memory_is_refused() {
        let mut b = BatchBuilder::new(BatchKind::Pages);
        b.push_page(4, &page(1));
        let body = body_of(&b.finish());
        let (table, data) = parse_body(BatchKind::Pages, &body).expect("parse");
        let mut memory = vec![0u8; 4 * PAGE_BYTES];
        let err = apply(&table, data, &mut SliceSink::pages(&mut memory)).expect_err("refuse");
        assert!(matches!(err, BatchError::Refused { addr: 4, .. }), "{err}");
        let mut b = BatchBuilder::new(BatchKind::Pages);
        b.push_page(u64::MAX, &page(1));
        let body = body_of(&b.finish());
        let (table, data) = parse_body(BatchKind::Pages, &body).expect("parse");
        assert!(apply(&table, data, &mut SliceSink::pages(&mut memory)).is_err());
    }

    #[test]
    fn extents_round_trip() {
        let mut b = BatchBuilder::new(BatchKind::Extents);
        b.push_extent(100, &[7u8; 300]);
        b.push_zero_extent(1000, 24);
        let body = body_of(&b.finish());
        let (table, data) = parse_body(BatchKind::Extents, &body).expect("parse");
        let mut disk = vec![1u8; 2048];
        apply(&table, data, &mut SliceSink::extents(&mut disk)).expect("apply");
        assert!(disk[100..400].iter().all(|b| *b == 7));
        assert!(disk[1000..1024].iter().all(|b| *b == 0));
        assert_eq!(disk[400], 1);
    }

    #[test]
    fn page_table_in_an_extent_frame_is_checked_by_the_right_rules() {
        let mut b = BatchBuilder::new(BatchKind::Extents);
        b.push_extent(0, &[1u8; 100]);
        let body = body_of(&b.finish());
        assert!(matches!(
            parse_body(BatchKind::Pages, &body),
            Err(BatchError::BadEntryLength { len: 100, .. })
        ));
    }

    #[test]
    fn data_length_mismatch_is_refused() {
        let mut b = BatchBuilder::new(BatchKind::Pages);
        b.push_page(0, &page(3));
        let body = body_of(&b.finish());
        let short = &body[..body.len() - 1];
        assert!(matches!(
            parse_body(BatchKind::Pages, short),
            Err(BatchError::DataLengthMismatch { .. })
        ));
        let mut long = body.to_vec();
        long.push(0);
        assert!(parse_body(BatchKind::Pages, &long).is_err());
    }

    #[test]
    fn is_zero_sees_a_single_set_byte() {
        let mut p = page(0);
        assert!(is_zero(&p));
        for i in [0, 7, 8, 4095] {
            p[i] = 1;
            assert!(!is_zero(&p));
            p[i] = 0;
        }
        assert!(!is_zero(&[0, 0, 0, 1]));
    }
}
