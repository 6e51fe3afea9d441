//! Bulk lanes: page batches on parallel streams, never through a mailbox.
//!
//! Pages are split by frame number (`gfn % lanes`), so every page always
//! travels on the same stream: a later round's copy of a page can never
//! overtake an earlier one, and each receiving lane writes its own pages.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use ferry_transport::batch::{BatchBuilder, BatchKind};
use ferry_transport::pool::BufferPool;
use ferry_transport::{
    FRAME_HEADER_BYTES, FrameKind, FrameReader, FrameWriter, RecvStream, SendStream,
};
use tokio::sync::mpsc;

use super::share::Flow;
use crate::guest::DirtyBitmap;
use crate::migration::LaneMark;
use crate::ram::{GuestRam, PageLane};

/// Pages per batch frame (1 MiB of data when none is zero).
pub const BATCH_PAGES: usize = 256;

/// One round's share for a lane.
#[derive(Debug, Clone)]
pub struct LaneJob {
    /// Round number.
    pub round: u32,
    /// The round's pages (all lanes share the bitmap).
    pub pages: Arc<DirtyBitmap>,
    /// Leave zero pages out (round 0).
    pub skip_zero: bool,
    /// The lane stream's send priority for this round (see
    /// [`Flow::stream_priority`]; the switchover's round goes first).
    pub stream_priority: i32,
}

/// Sends lane `lane` of `lanes`: for each job, its pages then a mark.
/// Every batch waits for its turn on the link (`flow`); its wire bytes
/// are added to `sent` once the stream took them.
pub async fn send_lane<S: SendStream>(
    mut writer: FrameWriter<S>,
    ram: GuestRam,
    (lane, lanes): (u32, u32),
    (flow, sent): (Flow, Arc<AtomicU64>),
    mut jobs: mpsc::UnboundedReceiver<LaneJob>,
) -> Result<(), String> {
    let pool = BufferPool::new(BATCH_PAGES * ferry_transport::PAGE_BYTES, 8);
    let mut batch = BatchBuilder::with_pool(BatchKind::Pages, pool);
    while let Some(job) = jobs.recv().await {
        writer.set_priority(job.stream_priority);
        let round = flow.round();
        let mut pages = 0u64;
        for gfn in job
            .pages
            .iter()
            .filter(|gfn| gfn % u64::from(lanes) == u64::from(lane))
        {
            let fill = |dst: &mut [u8]| ram.read_page(gfn, dst);
            let zero = if job.skip_zero {
                batch.push_nonzero_page_with(gfn, fill)
            } else {
                batch.push_page_with(gfn, fill)
            }
            .map_err(|e| e.to_string())?;
            if !(zero && job.skip_zero) {
                pages += 1;
            }
            if batch.len() >= BATCH_PAGES {
                send_batch(&mut writer, &flow, batch.finish(), &sent).await?;
            }
        }
        if !batch.is_empty() {
            send_batch(&mut writer, &flow, batch.finish(), &sent).await?;
        }
        // The round is sent: the lane is quiet until the next one.
        drop(round);
        let mark = LaneMark {
            round: job.round,
            pages,
        };
        writer
            .send_message(FrameKind::Control, &mark)
            .await
            .map_err(|e| e.to_string())?;
    }
    writer.finish().map_err(|e| e.to_string())
}

async fn send_batch<S: SendStream>(
    writer: &mut FrameWriter<S>,
    flow: &Flow,
    batch: ferry_transport::batch::EncodedBatch,
    sent: &AtomicU64,
) -> Result<(), String> {
    let bytes = batch.wire_len() as u64;
    let _turn = flow.turn(bytes).await;
    writer.send_batch(batch).await.map_err(|e| e.to_string())?;
    sent.fetch_add(bytes, Ordering::Relaxed);
    Ok(())
}

/// What a receiving lane reports after each round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaneRound {
    /// The lane.
    pub lane: u32,
    /// The round.
    pub round: u32,
    /// Pages written in it.
    pub pages: u64,
    /// Wire bytes received for it.
    pub bytes: u64,
}

/// Receives a lane into `sink` until the stream ends, reporting each
/// round's mark through `on_round` and adding every frame's wire bytes to
/// `arrived` as it comes (the destination's sign of life mid-round).
pub async fn receive_lane<R: RecvStream>(
    mut reader: FrameReader<R>,
    mut sink: PageLane,
    lane: u32,
    arrived: &AtomicU64,
    on_round: impl Fn(LaneRound),
) -> Result<(), String> {
    let mut bytes = 0u64;
    let mut pages_before = 0u64;
    while let Some(header) = reader.next_header().await.map_err(|e| e.to_string())? {
        match header.kind {
            FrameKind::PageBatch => {
                let stats = reader
                    .read_batch_into(header, &mut sink)
                    .await
                    .map_err(|e| format!("lane {lane}: {e}"))?;
                bytes += stats.wire_bytes as u64;
                arrived.fetch_add(stats.wire_bytes as u64, Ordering::Relaxed);
            }
            FrameKind::Control => {
                let body = reader
                    .read_body(header.body_len)
                    .await
                    .map_err(|e| e.to_string())?;
                let mark: LaneMark = ferry_transport::message::decode_body(&body)
                    .map_err(|e| format!("lane {lane}: {e}"))?;
                let mark_bytes = (FRAME_HEADER_BYTES + header.body_len) as u64;
                bytes += mark_bytes;
                arrived.fetch_add(mark_bytes, Ordering::Relaxed);
                sink.flush();
                let pages = sink.pages - pages_before;
                if pages != mark.pages {
                    return Err(format!(
                        "lane {lane} round {}: {pages} pages arrived, {} announced",
                        mark.round, mark.pages
                    ));
                }
                pages_before = sink.pages;
                on_round(LaneRound {
                    lane,
                    round: mark.round,
                    pages,
                    bytes,
                });
                bytes = 0;
            }
            other => return Err(format!("lane {lane}: unexpected {other:?} frame")),
        }
    }
    Ok(())
}
