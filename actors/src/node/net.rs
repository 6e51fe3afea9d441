//! The accept loop: authenticated connections in, streams dispatched by
//! their [`StreamIntro`].

use std::sync::Arc;

use ferry_transport::{Connection, FrameKind, FrameReader, FrameWriter, Role, Transport};
use ractor::ActorRef;
use tokio::sync::mpsc;

use super::NodeCtx;
use super::client::{ClientReply, ClientRequest, allowed};
use super::host::HostMsg;
use crate::migration::{SourceMsg, StreamIntro};

/// Accepts connections until the endpoint closes.
pub async fn serve<T: Transport>(ctx: Arc<NodeCtx<T>>, host: ActorRef<HostMsg<T>>) {
    loop {
        match ctx.transport.accept().await {
            Ok(conn) => {
                tokio::spawn(serve_connection::<T>(conn, host.clone()));
            }
            Err(e) if e.is_per_peer() => tracing::warn!("refused a peer: {e}"),
            Err(e) => {
                tracing::info!("accept loop ends: {e}");
                return;
            }
        }
    }
}

async fn serve_connection<T: Transport>(conn: T::Connection, host: ActorRef<HostMsg<T>>) {
    let peer = conn.peer().clone();
    // The session's own stream carries the version handshake; hold it for
    // the connection's life.
    let _session = match ferry_transport::session::accept(conn.clone()).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(peer = %peer.name, "session: {e}");
            return;
        }
    };
    loop {
        match conn.accept_stream().await {
            Ok((send, recv)) => {
                tokio::spawn(serve_stream::<T>(
                    peer.clone(),
                    FrameWriter::new(send),
                    FrameReader::new(recv),
                    host.clone(),
                ));
            }
            Err(_) => return,
        }
    }
}

async fn serve_stream<T: Transport>(
    peer: ferry_transport::PeerIdentity,
    mut writer: FrameWriter<<T::Connection as Connection>::Send>,
    mut reader: FrameReader<<T::Connection as Connection>::Recv>,
    host: ActorRef<HostMsg<T>>,
) {
    let intro = match reader.read_message::<StreamIntro>(FrameKind::Control).await {
        Ok(i) => i,
        Err(e) => {
            tracing::warn!(peer = %peer.name, "stream without an introduction: {e}");
            return;
        }
    };
    let host_only = !matches!(intro, StreamIntro::Client);
    if host_only && peer.role != Role::Host {
        tracing::warn!(peer = %peer.name, role = ?peer.role, "a non-host opened a host stream");
        return;
    }
    match intro {
        StreamIntro::Migration => {
            match reader.read_message::<SourceMsg>(FrameKind::Control).await {
                Ok(SourceMsg::Offer(offer)) => {
                    let _ = host.cast(HostMsg::IncomingMigration {
                        peer: peer.name,
                        offer: *offer,
                        writer,
                        reader,
                    });
                }
                Ok(other) => tracing::warn!(peer = %peer.name, "expected an offer: {other:?}"),
                Err(e) => tracing::warn!(peer = %peer.name, "reading the offer: {e}"),
            }
        }
        StreamIntro::Lane { migration_id, lane } => {
            let _ = host.cast(HostMsg::IncomingLane {
                peer: peer.name,
                migration_id,
                lane,
                reader,
            });
        }
        StreamIntro::Resolve { migration_id } => {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let _ = host.cast(HostMsg::Resolve {
                peer: peer.name,
                migration_id,
                reply: tx,
            });
            if let Ok(committed) = rx.await {
                let answer = crate::migration::wire::Resolution { committed };
                if writer
                    .send_message(FrameKind::Control, &answer)
                    .await
                    .is_ok()
                {
                    let _ = writer.finish();
                    let _ = reader.next_header().await;
                }
            }
        }
        StreamIntro::Disk { migration_id } => {
            let open = match reader
                .read_message::<crate::storage::remote::DiskOpen>(FrameKind::Control)
                .await
            {
                Ok(o) if o.migration_id == migration_id => o,
                Ok(_) => {
                    tracing::warn!(peer = %peer.name, "disk stream names another migration");
                    return;
                }
                Err(e) => {
                    tracing::warn!(peer = %peer.name, "reading a disk open: {e}");
                    return;
                }
            };
            let (tx, rx) = tokio::sync::oneshot::channel();
            let _ = host.cast(HostMsg::IncomingDisk {
                peer: peer.name.clone(),
                open,
                reply: tx,
            });
            match rx.await {
                Ok(Ok(incoming)) => {
                    if let Err(e) =
                        crate::storage::remote::receive_disk(writer, reader, incoming).await
                    {
                        tracing::warn!(peer = %peer.name, migration_id, "disk stream: {e}");
                    }
                }
                Ok(Err(reason)) => {
                    let _ = writer
                        .send_message(
                            FrameKind::Control,
                            &crate::storage::remote::DiskReply::Failed { reason },
                        )
                        .await;
                    let _ = writer.finish();
                    let _ = reader.next_header().await;
                }
                Err(_) => {}
            }
        }
        StreamIntro::Announce { mac, host: owner } => {
            let _ = host.cast(HostMsg::Announce { mac, host: owner });
        }
        StreamIntro::Client => {
            let request = match reader
                .read_message::<ClientRequest>(FrameKind::Control)
                .await
            {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(peer = %peer.name, "reading a request: {e}");
                    return;
                }
            };
            let (tx, mut rx) = mpsc::unbounded_channel();
            if allowed(peer.role, &request) {
                tracing::info!(client = %peer.subject, ?request, "request");
                let _ = match request {
                    ClientRequest::CancelMigration { id } => host.cast(HostMsg::Cancel {
                        id,
                        who: peer.name.clone(),
                        reply: tx,
                    }),
                    request => host.cast(HostMsg::Client(request, tx)),
                };
            } else {
                let _ = tx.send(ClientReply::Error(format!(
                    "permission denied: role {:?} may not do this",
                    peer.role
                )));
            }
            while let Some(reply) = rx.recv().await {
                let last = !matches!(reply, ClientReply::Progress(_));
                if writer
                    .send_message(FrameKind::Control, &reply)
                    .await
                    .is_err()
                {
                    return;
                }
                if last {
                    break;
                }
            }
            let _ = writer.finish();
            // Hold the stream until the client has read the last reply.
            let _ = reader.next_header().await;
        }
    }
}
