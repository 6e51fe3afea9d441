//! QUIC stream priorities: with both streams' data queued, the
//! higher-priority stream's data goes first (the migration lanes of a
//! high-priority migration use this on a shared connection).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::quic_pair;
use ferry_transport::{Connection, RecvStream, SendStream, Transport};

const STREAM_BYTES: usize = 24 << 20;
const CHUNK_BYTES: usize = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_higher_priority_stream_is_sent_first() {
    let pair = quic_pair();
    let (server, client) = tokio::join!(pair.server.accept(), pair.client.connect(&pair.addr));
    let (server, client) = (server.expect("accept"), client.expect("connect"));

    // Bytes each stream delivered so far, by its tag.
    let counts: Arc<[AtomicUsize; 256]> = Arc::new(std::array::from_fn(|_| AtomicUsize::new(0)));
    let receiver = tokio::spawn({
        let counts = counts.clone();
        async move {
            let mut readers = Vec::new();
            for _ in 0..2 {
                let (_send, recv) = server.accept_stream().await.expect("stream");
                let counts = counts.clone();
                readers.push(tokio::spawn(async move {
                    let mut recv = recv;
                    // (tag, what the other stream had when this one had all)
                    let mut done = None;
                    while let Some(chunk) = recv.read_chunk(1 << 20).await.expect("read") {
                        let tag = chunk[0];
                        let other = if tag == b'H' { b'L' } else { b'H' };
                        let bytes = counts[tag as usize].fetch_add(chunk.len(), Ordering::SeqCst)
                            + chunk.len();
                        if bytes == STREAM_BYTES {
                            done = Some((tag, counts[other as usize].load(Ordering::SeqCst)));
                        }
                    }
                    done.expect("every byte")
                }));
            }
            let mut ends = Vec::new();
            for r in readers {
                ends.push(r.await.expect("reader"));
            }
            ends
        }
    });

    // The low one is queued in full first, then the high one.
    let (mut low, _) = client.open_stream().await.expect("open");
    let (mut high, _) = client.open_stream().await.expect("open");
    low.set_priority(-16);
    high.set_priority(-13);
    // Chunks are built first, so both streams are queued within
    // moments (a write returns once QUIC holds the data).
    let chunks = |tag: u8| {
        let chunk = Bytes::from(vec![tag; CHUNK_BYTES]);
        vec![chunk; STREAM_BYTES / CHUNK_BYTES]
    };
    let (low_data, high_data) = (chunks(b'L'), chunks(b'H'));
    low.write_chunks(low_data).await.expect("write");
    high.write_chunks(high_data).await.expect("write");
    low.finish().expect("finish");
    high.finish().expect("finish");
    let ends = tokio::time::timeout(Duration::from_secs(30), receiver)
        .await
        .expect("delivered in time")
        .expect("receiver");
    let (_, low_when_high_done) = *ends.iter().find(|e| e.0 == b'H').expect("high");
    println!(
        "the low stream had {:.1} MiB of {} when the high one was complete",
        low_when_high_done as f64 / f64::from(1 << 20),
        STREAM_BYTES >> 20
    );
    // Round robin would have delivered nearly all of the low stream too.
    assert!(
        low_when_high_done < STREAM_BYTES / 2,
        "the low stream had {} MiB of {} when the high one was complete",
        low_when_high_done >> 20,
        STREAM_BYTES >> 20
    );
}
