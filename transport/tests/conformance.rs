//! One behaviour suite, run against the QUIC and the in-memory transport.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{Pair, mem_pair, quic_pair};
use ferry_transport::batch::{BatchBuilder, BatchError, BatchKind, SliceSink};
use ferry_transport::session::{self, SessionError};
use ferry_transport::version::{PROTOCOL_VERSION, PROTOCOL_VERSION_PREVIOUS};
use ferry_transport::{
    Connection, FRAME_HEADER_BYTES, FrameHeader, FrameKind, FrameReader, FrameWriter, PAGE_BYTES,
    ReadError, Role, Transport,
};

const LIMIT: Duration = Duration::from_secs(10);

async fn connected<T: Transport>(pair: &Pair<T>) -> (T::Connection, T::Connection) {
    let (server, client) = tokio::join!(pair.server.accept(), pair.client.connect(&pair.addr));
    (server.expect("accept"), client.expect("connect"))
}

async fn peers_see_each_others_certificates<T: Transport>(pair: Pair<T>) {
    let (server, client) = connected(&pair).await;
    assert_eq!(server.peer().name, "alice");
    assert_eq!(server.peer().role, Role::Operator);
    assert!(server.peer().subject.contains("alice"));
    assert_eq!(client.peer().name, "host-a");
    assert_eq!(pair.server.local_identity().name, "host-a");
}

async fn version_handshake<T: Transport>(pair: Pair<T>) {
    let (server, client) = connected(&pair).await;
    let (s, c) = tokio::join!(session::accept(server), session::open(client, "alice"));
    assert_eq!(s.expect("accept").version, PROTOCOL_VERSION);
    assert_eq!(c.expect("open").version, PROTOCOL_VERSION);

    let (server, client) = connected(&pair).await;
    let (s, c) = tokio::join!(
        session::accept(server),
        session::open_with_version(client, "old", PROTOCOL_VERSION_PREVIOUS)
    );
    assert_eq!(s.expect("accept").version, PROTOCOL_VERSION_PREVIOUS);
    assert_eq!(c.expect("open").version, PROTOCOL_VERSION_PREVIOUS);

    let (server, client) = connected(&pair).await;
    let future = PROTOCOL_VERSION + 5;
    let (s, c) = tokio::join!(
        session::accept(server),
        session::open_with_version(client, "future", future)
    );
    for err in [
        s.expect_err("server refuses"),
        c.expect_err("client refused"),
    ] {
        let SessionError::VersionRefused(text) = err else {
            panic!("expected a version refusal, got {err:?}");
        };
        assert!(text.contains(&format!("v{future}")), "{text}");
        assert!(text.contains(&format!("v{PROTOCOL_VERSION}")), "{text}");
    }
}

/// Every third page is zero; the rest carry their stream and frame number.
fn fill(stream: usize, gfn: usize) -> u8 {
    if gfn.is_multiple_of(3) {
        0
    } else {
        u8::try_from((stream * 31 + gfn) % 251).expect("below 251") | 1
    }
}

async fn batches_on_parallel_streams<T: Transport>(pair: Pair<T>) {
    let (server, client) = connected(&pair).await;
    const STREAMS: usize = 4;
    const PAGES: usize = 300;
    let sender = tokio::spawn(async move {
        let mut tasks = Vec::new();
        for s in 0..STREAMS {
            let client = client.clone();
            tasks.push(tokio::spawn(async move {
                let (send, _recv) = client.open_stream().await.expect("open");
                let mut w = FrameWriter::new(send);
                let mut b = BatchBuilder::new(BatchKind::Pages);
                for gfn in 0..PAGES {
                    // Every third page is zero; the rest carry their stream and frame number.
                    b.push_page(gfn as u64, &[fill(s, gfn); PAGE_BYTES]);
                    if b.len() == 64 {
                        w.send_batch(b.finish()).await.expect("send");
                    }
                }
                w.send_batch(b.finish()).await.expect("send");
                w.send_end().await.expect("end");
                w.finish().expect("finish");
                // Keep the connection until the receiver is done.
                tokio::time::sleep(Duration::from_millis(200)).await;
            }));
        }
        for t in tasks {
            t.await.expect("sender task");
        }
        client
    });
    let mut received = Vec::new();
    for _ in 0..STREAMS {
        let (_send, recv) = server.accept_stream().await.expect("accept stream");
        received.push(tokio::spawn(async move {
            let mut memory = vec![0xEEu8; PAGES * PAGE_BYTES];
            let mut r = FrameReader::new(recv);
            let (mut data, mut zero) = (0, 0);
            loop {
                let h = r.next_header().await.expect("header").expect("not ended");
                if h.kind == FrameKind::End {
                    break;
                }
                let stats = r
                    .read_batch_into(h, &mut SliceSink::pages(&mut memory))
                    .await
                    .expect("batch");
                data += stats.data_entries;
                zero += stats.zero_entries;
            }
            assert!(r.next_header().await.expect("clean end").is_none());
            (memory, data, zero)
        }));
    }
    let mut streams_seen = std::collections::HashSet::new();
    for task in received {
        let (memory, data, zero) = task.await.expect("receiver");
        assert_eq!((data, zero), (PAGES - PAGES.div_ceil(3), PAGES.div_ceil(3)));
        // Streams arrive in any order: page 1's fill names the stream.
        let s = (0..STREAMS)
            .find(|s| fill(*s, 1) == memory[PAGE_BYTES])
            .expect("page 1 names its stream");
        streams_seen.insert(s);
        for gfn in 0..PAGES {
            let want = fill(s, gfn);
            let page = &memory[gfn * PAGE_BYTES..(gfn + 1) * PAGE_BYTES];
            assert!(page.iter().all(|b| *b == want), "stream {s} page {gfn}");
        }
    }
    assert_eq!(streams_seen.len(), STREAMS);
    drop(sender.await.expect("sender"));
}

/// Opens a stream, sends `bytes`, and returns what the reader makes of the
/// first frame: a batch read into 16 pages of memory.
async fn read_hostile<T: Transport>(
    pair: &Pair<T>,
    bytes: Bytes,
    finish: bool,
) -> Result<(), ReadError> {
    let (server, client) = connected(pair).await;
    let (send, _recv) = client.open_stream().await.expect("open");
    let mut w = FrameWriter::new(send);
    w.send_raw(bytes).await.expect("write");
    if finish {
        w.finish().expect("finish");
    }
    let (_send, recv) = server.accept_stream().await.expect("accept");
    let mut r = FrameReader::new(recv);
    let mut memory = vec![0u8; 16 * PAGE_BYTES];
    let result = tokio::time::timeout(LIMIT, async {
        let h = r
            .next_header()
            .await?
            .ok_or(ReadError::Ended(FrameKind::PageBatch))?;
        r.read_batch_into(h, &mut SliceSink::pages(&mut memory))
            .await?;
        Ok(())
    })
    .await
    .expect("a hostile frame must not hang the reader");
    drop(w);
    result
}

async fn hostile_frames_are_refused<T: Transport>(pair: Pair<T>) {
    // An oversized length is refused from the header alone, with the stream
    // left open: nothing waits for the body.
    let mut header = FrameHeader::new(FrameKind::PageBatch, 0).encode();
    header[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
    let err = read_hostile(&pair, Bytes::copy_from_slice(&header), false).await;
    assert!(matches!(err, Err(ReadError::Frame(_))), "{err:?}");

    let err = read_hostile(&pair, Bytes::from_static(b"GET / HTTP/1.1\r\n\r\n"), true).await;
    assert!(matches!(err, Err(ReadError::Frame(_))), "{err:?}");

    let mut b = BatchBuilder::new(BatchKind::Pages);
    b.push_page(3, &[1u8; PAGE_BYTES]);
    let whole = b.finish().to_contiguous();
    let cut = whole.slice(..whole.len() - 100);
    let err = read_hostile(&pair, cut, true).await;
    assert!(matches!(err, Err(ReadError::Truncated { .. })), "{err:?}");

    // A valid archive whose frame number lies beyond the 16 pages of memory.
    let mut b = BatchBuilder::new(BatchKind::Pages);
    b.push_page(16, &[1u8; PAGE_BYTES]);
    let err = read_hostile(&pair, b.finish().to_contiguous(), true).await;
    assert!(
        matches!(
            err,
            Err(ReadError::Batch(BatchError::Refused { addr: 16, .. }))
        ),
        "{err:?}"
    );

    // A table that does not validate as an archive.
    let mut body = vec![8u8, 0, 0, 0];
    body.extend_from_slice(&[0xFF; 8]);
    let mut frame = FrameHeader::new(FrameKind::PageBatch, body.len())
        .encode()
        .to_vec();
    frame.extend_from_slice(&body);
    let err = read_hostile(&pair, Bytes::from(frame), true).await;
    assert!(
        matches!(err, Err(ReadError::Batch(BatchError::InvalidTable(_)))),
        "{err:?}"
    );
    assert_eq!(FRAME_HEADER_BYTES, 8);
}

async fn close_fails_pending_work<T: Transport>(pair: Pair<T>) {
    let (server, client) = connected(&pair).await;
    let waiting = tokio::spawn({
        let server = server.clone();
        async move { server.accept_stream().await.map(|_| ()) }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    client.close("test over");
    server.close("test over");
    let result = tokio::time::timeout(LIMIT, waiting)
        .await
        .expect("accept_stream must not hang after close")
        .expect("task");
    assert!(result.is_err());
    assert!(client.open_stream().await.is_err());
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod quic {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::quic_pair()).await;
                }
            )*
        }
        mod mem {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::mem_pair()).await;
                }
            )*
        }
    };
}

conformance!(
    peers_see_each_others_certificates,
    version_handshake,
    batches_on_parallel_streams,
    hostile_frames_are_refused,
    close_fails_pending_work,
);
