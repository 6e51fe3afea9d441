//! Streams of chunks, and the frame reader and writer over them.
//!
//! Streams move [`Bytes`] chunks rather than copying into caller buffers:
//! quinn hands out the decrypted packet payloads as `Bytes`, and the batch
//! reader copies page data from those chunks straight into guest memory, so
//! a page is copied once on the receiving side.

use std::future::Future;

use bytes::{Bytes, BytesMut};

use crate::batch::{self, BatchError, BatchKind, BatchSink};
use crate::frame::{FRAME_HEADER_BYTES, FrameError, FrameHeader, FrameKind};
use crate::limits::BATCH_HEADER_BYTES_MAX;
use crate::message::{self, MessageError, WireDecode, WireEncode};

/// A stream failed underneath the framing.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum StreamError {
    /// The peer reset the stream.
    #[error("stream reset by peer (code {0})")]
    Reset(u64),
    /// The peer stopped reading.
    #[error("peer stopped reading the stream (code {0})")]
    Stopped(u64),
    /// The connection under the stream is gone.
    #[error("connection lost: {0}")]
    ConnectionLost(String),
    /// The stream was already finished by this side.
    #[error("stream already finished")]
    Finished,
}

/// The sending half of a stream.
pub trait SendStream: std::fmt::Debug + Send + 'static {
    /// Queues `chunk` for sending, waiting for flow-control credit.
    fn write_chunk(&mut self, chunk: Bytes)
    -> impl Future<Output = Result<(), StreamError>> + Send;

    /// Queues several chunks in order.
    fn write_chunks(
        &mut self,
        chunks: Vec<Bytes>,
    ) -> impl Future<Output = Result<(), StreamError>> + Send {
        async move {
            for chunk in chunks {
                self.write_chunk(chunk).await?;
            }
            Ok(())
        }
    }

    /// Ends the stream once queued data is delivered.
    fn finish(&mut self) -> Result<(), StreamError>;

    /// When streams of one connection all have data queued, those of a
    /// higher `priority` are sent first (QUIC stream priority; 0 is the
    /// default). Transports without a send queue of their own ignore it.
    fn set_priority(&mut self, _priority: i32) {}
}

/// The receiving half of a stream.
pub trait RecvStream: std::fmt::Debug + Send + 'static {
    /// The next chunk of at most `max` bytes, or `None` at the end of the stream.
    fn read_chunk(
        &mut self,
        max: usize,
    ) -> impl Future<Output = Result<Option<Bytes>, StreamError>> + Send;
}

/// Why reading a frame failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The stream failed.
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// The frame header was refused.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The message body was refused.
    #[error(transparent)]
    Message(#[from] MessageError),
    /// The batch was refused.
    #[error(transparent)]
    Batch(#[from] BatchError),
    /// The stream ended inside a frame.
    #[error("stream ended {missing} bytes short of a complete frame")]
    Truncated {
        /// Bytes still expected.
        missing: usize,
    },
    /// A frame of another kind than the protocol allows here.
    #[error("expected a {expected:?} frame, got {got:?}")]
    UnexpectedKind {
        /// What the protocol allows.
        expected: FrameKind,
        /// What arrived.
        got: FrameKind,
    },
    /// The stream ended where a frame was required.
    #[error("stream ended before a {0:?} frame")]
    Ended(FrameKind),
}

/// What a received batch held.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchStats {
    /// Entries that carried data.
    pub data_entries: usize,
    /// Entries flagged zero.
    pub zero_entries: usize,
    /// Frame bytes received (header included).
    pub wire_bytes: usize,
}

/// Reads frames from a [`RecvStream`].
#[derive(Debug)]
pub struct FrameReader<R> {
    stream: R,
    pending: Bytes,
}

impl<R: RecvStream> FrameReader<R> {
    /// A reader over `stream`.
    pub fn new(stream: R) -> Self {
        Self {
            stream,
            pending: Bytes::new(),
        }
    }

    /// The next chunk of at most `max` bytes; `None` at the end of the stream.
    async fn next_chunk(&mut self, max: usize) -> Result<Option<Bytes>, StreamError> {
        if !self.pending.is_empty() {
            let n = max.min(self.pending.len());
            return Ok(Some(self.pending.split_to(n)));
        }
        self.stream.read_chunk(max).await
    }

    async fn fill_exact(&mut self, mut dst: &mut [u8]) -> Result<(), ReadError> {
        while !dst.is_empty() {
            let Some(chunk) = self.next_chunk(dst.len()).await? else {
                return Err(ReadError::Truncated { missing: dst.len() });
            };
            let (head, rest) = dst.split_at_mut(chunk.len());
            head.copy_from_slice(&chunk);
            dst = rest;
        }
        Ok(())
    }

    /// The next frame's header, or `None` when the stream ended cleanly
    /// between frames.
    pub async fn next_header(&mut self) -> Result<Option<FrameHeader>, ReadError> {
        let mut bytes = [0u8; FRAME_HEADER_BYTES];
        let Some(first) = self.next_chunk(FRAME_HEADER_BYTES).await? else {
            return Ok(None);
        };
        bytes[..first.len()].copy_from_slice(&first);
        self.fill_exact(&mut bytes[first.len()..]).await?;
        Ok(Some(FrameHeader::decode(&bytes)?))
    }

    /// Reads a body of `len` bytes (already checked against its limit).
    /// Zero-copy when the body sits inside one received chunk.
    pub async fn read_body(&mut self, len: usize) -> Result<Bytes, ReadError> {
        if self.pending.len() >= len {
            return Ok(self.pending.split_to(len));
        }
        let mut out = BytesMut::with_capacity(len);
        while out.len() < len {
            let Some(chunk) = self.next_chunk(len - out.len()).await? else {
                return Err(ReadError::Truncated {
                    missing: len - out.len(),
                });
            };
            if out.is_empty() && chunk.len() == len {
                return Ok(chunk);
            }
            out.extend_from_slice(&chunk);
        }
        Ok(out.freeze())
    }

    /// Reads the next frame, which must be of `kind`, and decodes its body.
    pub async fn read_message<T>(&mut self, kind: FrameKind) -> Result<T, ReadError>
    where
        T: WireDecode,
        T::Archived: for<'a> rkyv::bytecheck::CheckBytes<
                rkyv::api::high::HighValidator<'a, rkyv::rancor::Error>,
            > + rkyv::Deserialize<T, rkyv::api::high::HighDeserializer<rkyv::rancor::Error>>,
    {
        let header = self.next_header().await?.ok_or(ReadError::Ended(kind))?;
        if header.kind != kind {
            return Err(ReadError::UnexpectedKind {
                expected: kind,
                got: header.kind,
            });
        }
        let body = self.read_body(header.body_len).await?;
        Ok(message::decode_body(&body)?)
    }

    /// Reads the body of a batch frame whose `header` was just read, copying
    /// each entry's data from the received chunks straight into `sink`.
    ///
    /// The whole table is validated, and the data length checked against the
    /// frame length, before a data byte is read.
    pub async fn read_batch_into(
        &mut self,
        header: FrameHeader,
        sink: &mut (dyn BatchSink + Send),
    ) -> Result<BatchStats, ReadError> {
        let kind = match header.kind {
            FrameKind::PageBatch => BatchKind::Pages,
            FrameKind::ExtentBatch => BatchKind::Extents,
            other => {
                return Err(ReadError::UnexpectedKind {
                    expected: FrameKind::PageBatch,
                    got: other,
                });
            }
        };
        if header.body_len < 4 {
            return Err(BatchError::Truncated {
                body: header.body_len,
                needed: 4,
            }
            .into());
        }
        let mut len_bytes = [0u8; 4];
        self.fill_exact(&mut len_bytes).await?;
        let table_len = u32::from_le_bytes(len_bytes) as usize;
        if table_len > BATCH_HEADER_BYTES_MAX {
            return Err(BatchError::TableTooLong(table_len).into());
        }
        if table_len > header.body_len - 4 {
            return Err(BatchError::Truncated {
                body: header.body_len,
                needed: 4 + table_len,
            }
            .into());
        }
        let table_bytes = self.read_body(table_len).await?;
        let table = batch::check_table(kind, &table_bytes)?;
        let data_len = header.body_len - 4 - table_len;
        if data_len != table.data_len {
            return Err(BatchError::DataLengthMismatch {
                actual: data_len,
                expected: table.data_len,
            }
            .into());
        }
        let mut stats = BatchStats {
            wire_bytes: FRAME_HEADER_BYTES + header.body_len,
            ..BatchStats::default()
        };
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
                stats.zero_entries += 1;
            } else {
                let slot = sink.slot(e.addr, len).map_err(refused)?;
                self.fill_exact(slot).await?;
                stats.data_entries += 1;
            }
        }
        Ok(stats)
    }

    /// The stream underneath.
    pub fn into_inner(self) -> R {
        self.stream
    }
}

/// Writes frames to a [`SendStream`].
#[derive(Debug)]
pub struct FrameWriter<S> {
    stream: S,
}

/// Why writing a frame failed.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The stream failed.
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// The message could not be encoded.
    #[error(transparent)]
    Message(#[from] MessageError),
}

impl<S: SendStream> FrameWriter<S> {
    /// A writer over `stream`.
    pub fn new(stream: S) -> Self {
        Self { stream }
    }

    /// Sets the stream's send priority ([`SendStream::set_priority`]).
    pub fn set_priority(&mut self, priority: i32) {
        self.stream.set_priority(priority);
    }

    /// Sends `value` as a frame of `kind`.
    pub async fn send_message<T: WireEncode>(
        &mut self,
        kind: FrameKind,
        value: &T,
    ) -> Result<(), WriteError> {
        let frame = message::encode_frame(kind, value)?;
        self.stream.write_chunk(frame).await?;
        Ok(())
    }

    /// Sends an encoded batch without copying its data.
    pub async fn send_batch(&mut self, batch: batch::EncodedBatch) -> Result<(), WriteError> {
        if batch.data.is_empty() {
            self.stream.write_chunk(batch.head).await?;
        } else {
            self.stream
                .write_chunks(vec![batch.head, batch.data])
                .await?;
        }
        Ok(())
    }

    /// Sends an [`FrameKind::End`] frame.
    pub async fn send_end(&mut self) -> Result<(), WriteError> {
        let header = FrameHeader::new(FrameKind::End, 0).encode();
        self.stream
            .write_chunk(Bytes::copy_from_slice(&header))
            .await?;
        Ok(())
    }

    /// Writes raw bytes (tests use it to send hostile input).
    pub async fn send_raw(&mut self, bytes: Bytes) -> Result<(), WriteError> {
        self.stream.write_chunk(bytes).await?;
        Ok(())
    }

    /// Ends the stream.
    pub fn finish(&mut self) -> Result<(), WriteError> {
        Ok(self.stream.finish()?)
    }

    /// The stream underneath.
    pub fn into_inner(self) -> S {
        self.stream
    }
}
