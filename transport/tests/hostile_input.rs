//! Property tests: the frame header decoder, the batch parser and the
//! streaming batch reader never panic and never accept malformed input,
//! whatever bytes arrive.

use bytes::Bytes;
use ferry_transport::batch::{self, BatchBuilder, BatchKind, SliceSink};
use ferry_transport::mem::MemNetwork;
use ferry_transport::message::decode_body;
use ferry_transport::version::Hello;
use ferry_transport::{
    Connection, FRAME_HEADER_BYTES, FrameHeader, FrameKind, FrameReader, FrameWriter, PAGE_BYTES,
    PeerIdentity, Role, Transport,
};
use proptest::prelude::*;

fn valid_batch(pages: &[(u8, u8)]) -> Vec<u8> {
    let mut b = BatchBuilder::new(BatchKind::Pages);
    for (gfn, fill) in pages {
        b.push_page(u64::from(*gfn % 8), &[*fill; PAGE_BYTES]);
    }
    b.finish().to_contiguous().to_vec()
}

/// Feeds `bytes` to a frame reader over an in-memory stream and reads every
/// frame it can; returns how many batches were accepted.
fn read_all(bytes: Vec<u8>, chunk: usize) -> usize {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let net = MemNetwork::new();
        let a = net.endpoint(PeerIdentity::new("a", Role::Host));
        let b = net.endpoint(PeerIdentity::new("b", Role::Host));
        let addr = "a".to_owned();
        let (server, client) = tokio::join!(a.accept(), b.connect(&addr));
        let (server, client) = (server.expect("accept"), client.expect("connect"));
        let (send, _r) = client.open_stream().await.expect("open");
        let writer = tokio::spawn(async move {
            let mut w = FrameWriter::new(send);
            for piece in bytes.chunks(chunk.max(1)) {
                if w.send_raw(Bytes::copy_from_slice(piece)).await.is_err() {
                    return;
                }
            }
            let _ = w.finish();
        });
        let (_s, recv) = server.accept_stream().await.expect("accept stream");
        let mut reader = FrameReader::new(recv);
        let mut memory = vec![0u8; 8 * PAGE_BYTES];
        let mut accepted = 0;
        while let Ok(Some(h)) = reader.next_header().await {
            match h.kind {
                FrameKind::PageBatch | FrameKind::ExtentBatch => {
                    let sink = &mut SliceSink::pages(&mut memory);
                    if reader.read_batch_into(h, sink).await.is_err() {
                        break;
                    }
                    accepted += 1;
                }
                _ => {
                    if reader.read_body(h.body_len).await.is_err() {
                        break;
                    }
                }
            }
        }
        drop(reader);
        let _ = writer.await;
        accepted
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn header_decoder_never_panics(bytes in any::<[u8; FRAME_HEADER_BYTES]>()) {
        if let Ok(h) = FrameHeader::decode(&bytes) {
            prop_assert!(h.body_len <= h.kind.body_bytes_max());
            prop_assert_eq!(h.encode(), bytes);
        }
    }

    #[test]
    fn batch_parser_never_panics(body in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let mut memory = vec![0u8; 8 * PAGE_BYTES];
        for kind in [BatchKind::Pages, BatchKind::Extents] {
            if let Ok((table, data)) = batch::parse_body(kind, &body) {
                let _ = batch::apply(&table, data, &mut SliceSink::pages(&mut memory));
            }
        }
        let _ = decode_body::<Hello>(&body);
    }

    #[test]
    fn mutated_batches_are_applied_whole_or_refused(
        pages in proptest::collection::vec((any::<u8>(), any::<u8>()), 1..6),
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4),
    ) {
        let mut frame = valid_batch(&pages);
        let table_end = FRAME_HEADER_BYTES + 4 + u32::from_le_bytes(
            frame[FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + 4].try_into().expect("4 bytes")) as usize;
        for (at, xor) in flips {
            // Corrupt the header and table, where the structure lives.
            let at = at % table_end.min(frame.len());
            frame[at] ^= xor | 1;
        }
        let body = &frame[FRAME_HEADER_BYTES..];
        let mut memory = vec![0u8; 8 * PAGE_BYTES];
        if let Ok((table, data)) = batch::parse_body(BatchKind::Pages, body) {
            // Whatever survived validation is self-consistent.
            prop_assert_eq!(table.data_len, data.len());
            let _ = batch::apply(&table, data, &mut SliceSink::pages(&mut memory));
        }
    }

    #[test]
    fn stream_reader_survives_garbage_and_truncation(
        garbage in proptest::collection::vec(any::<u8>(), 0..512),
        pages in proptest::collection::vec((any::<u8>(), any::<u8>()), 1..4),
        cut in any::<usize>(),
        chunk in 1usize..5000,
    ) {
        let mut good = valid_batch(&pages);
        let accepted = read_all(good.clone(), chunk);
        prop_assert_eq!(accepted, 1);
        let cut = cut % good.len();
        good.truncate(cut);
        prop_assert_eq!(read_all(good, chunk), 0, "a truncated batch must not be accepted");
        let _ = read_all(garbage, chunk);
    }
}
