//! The accept loop: authenticated connections in, streams dispatched by
//! their [`StreamIntro`].

use std::sync::Arc;
use std::time::Instant;

use ferry_transport::{Connection, FrameKind, FrameReader, FrameWriter, Role, Transport};
use ractor::ActorRef;
use tokio::sync::mpsc;

use super::NodeCtx;
use super::client::{ClientReply, ClientRequest, action, allowed, is_read, subject};
use super::host::HostMsg;
use crate::migration::{SourceMsg, StreamIntro};
use crate::ops::audit::AuditEntry;

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
                answer_once(writer, reader, &answer).await;
            }
        }
        StreamIntro::Arrived { migration_id, vm } => {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let _ = host.cast(HostMsg::ArrivalQuestion {
                peer: peer.name,
                vm,
                migration_id,
                reply: tx,
            });
            if let Ok(ownership) = rx.await {
                answer_once(writer, reader, &ownership).await;
            }
        }
        StreamIntro::Confirm { migration_id, vm } => {
            let _ = host.cast(HostMsg::ArrivalSettled {
                vm,
                peer: peer.name,
                migration_id,
                ownership: crate::migration::wire::Ownership::Yours,
            });
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
            let asked = Instant::now();
            let mut audit = AuditEntry {
                at_unix_ms: crate::ops::unix_ms_now(),
                node: String::new(),
                who: peer.subject.clone(),
                action: action(&request).into(),
                vm: String::new(),
                from: String::new(),
                to: String::new(),
                duration_ms: 0,
                downtime_ms: None,
                outcome: String::new(),
                detail: String::new(),
                read: is_read(&request),
            };
            (audit.vm, audit.to) = subject(&request);
            // Hosts asking each other for their load are not users.
            let audited = request != ClientRequest::HostLoad;
            match allowed(peer.role, &request) {
                Ok(()) => {
                    tracing::info!(client = %peer.subject, ?request, "request");
                    let _ = match request {
                        ClientRequest::CancelMigration { id } => host.cast(HostMsg::Cancel {
                            id,
                            who: peer.name.clone(),
                            reply: tx,
                        }),
                        request => host.cast(HostMsg::Client(request, peer.subject.clone(), tx)),
                    };
                }
                Err(why) => {
                    tracing::warn!(client = %peer.subject, ?request, "refused: {why}");
                    let _ = tx.send(ClientReply::Error(format!("permission denied: {why}")));
                }
            }
            let mut answered = false;
            while let Some(reply) = rx.recv().await {
                let last = !matches!(reply, ClientReply::Progress(_));
                if last && audited {
                    // Recorded before the client hears the answer, so a
                    // look at the log right after finds it.
                    answered = true;
                    audit.duration_ms =
                        u64::try_from(asked.elapsed().as_millis()).unwrap_or(u64::MAX);
                    judge(&mut audit, Some(&reply));
                    let _ = host.cast(HostMsg::Audit(Box::new(audit.clone())));
                }
                let sent = writer.send_message(FrameKind::Control, &reply).await;
                if sent.is_err() || last {
                    break;
                }
            }
            if audited && !answered {
                audit.duration_ms = u64::try_from(asked.elapsed().as_millis()).unwrap_or(u64::MAX);
                judge(&mut audit, None);
                let _ = host.cast(HostMsg::Audit(Box::new(audit)));
            }
            let _ = writer.finish();
            // Hold the stream until the client has read the last reply.
            let _ = reader.next_header().await;
        }
    }
}

/// Fills in how a request ended from its final reply.
fn judge(audit: &mut AuditEntry, reply: Option<&ClientReply>) {
    let (outcome, detail) = match reply {
        None => (
            "left",
            "the client left before the answer (a migration goes on as a job: the scheduler audits how it ends)"
                .to_owned(),
        ),
        Some(ClientReply::Error(e)) if e.starts_with("permission denied") => ("refused", e.clone()),
        Some(ClientReply::Error(e)) => ("failed", e.clone()),
        Some(ClientReply::Report(r)) => {
            audit.from.clone_from(&r.from);
            audit.to.clone_from(&r.to);
            match &r.outcome {
                crate::migration::Outcome::Completed => {
                    audit.downtime_ms = Some(r.downtime_ms);
                    (
                        "ok",
                        format!(
                            "migration {}",
                            crate::migration::report::show_id(r.migration_id)
                        ),
                    )
                }
                crate::migration::Outcome::Aborted { reason } => ("aborted", reason.clone()),
                crate::migration::Outcome::InDoubt { reason } => ("in doubt", reason.clone()),
            }
        }
        Some(ClientReply::JobQueued(job)) => (
            "queued",
            format!(
                "job {} at {}",
                job.id,
                crate::migration::report_text::utc(job.not_before_unix_ms)
            ),
        ),
        Some(ClientReply::Evacuated(jobs)) => {
            let moved = jobs
                .iter()
                .filter(|j| j.state == crate::ops::jobs::JobState::Done)
                .count();
            (
                if moved == jobs.len() { "ok" } else { "failed" },
                format!("{moved} of {} VMs moved", jobs.len()),
            )
        }
        Some(_) => ("ok", String::new()),
    };
    outcome.clone_into(&mut audit.outcome);
    audit.detail = detail;
}

/// Sends the one answer a question stream gets, finishes it and waits
/// until the asker has read it (closed its end).
async fn answer_once<S, R, M>(mut writer: FrameWriter<S>, mut reader: FrameReader<R>, answer: &M)
where
    S: ferry_transport::SendStream,
    R: ferry_transport::RecvStream,
    M: ferry_transport::message::WireEncode,
{
    if writer
        .send_message(FrameKind::Control, answer)
        .await
        .is_ok()
    {
        let _ = writer.finish();
        let _ = reader.next_header().await;
    }
}
