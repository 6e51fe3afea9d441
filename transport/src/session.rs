//! A connection's control stream and the version handshake on it.
//!
//! The dialling side opens the first stream and sends [`Hello`]; the
//! accepting side answers with [`HelloReply`]. On a refusal both sides get a
//! [`SessionError::VersionRefused`] naming both versions, and the accepting
//! side closes the connection.

use crate::frame::FrameKind;
use crate::stream::{FrameReader, FrameWriter, ReadError, WriteError};
use crate::transport::{Connection, TransportError};
use crate::version::{self, Hello, HelloReply, PROTOCOL_VERSION};

/// How long a refusing side waits for the peer to read the refusal.
const REFUSAL_LINGER: std::time::Duration = std::time::Duration::from_secs(2);

/// Why a session could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The connection failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// Reading the handshake failed.
    #[error("read handshake: {0}")]
    Read(#[from] ReadError),
    /// Writing the handshake failed.
    #[error("write handshake: {0}")]
    Write(#[from] WriteError),
    /// The versions do not match.
    #[error("{0}")]
    VersionRefused(String),
}

/// A connection with its control stream, after the version handshake.
#[derive(Debug)]
pub struct Session<C: Connection> {
    /// The connection, for opening bulk streams.
    pub conn: C,
    /// Control stream, sending half.
    pub writer: FrameWriter<C::Send>,
    /// Control stream, receiving half.
    pub reader: FrameReader<C::Recv>,
    /// The negotiated protocol version.
    pub version: u16,
}

/// Opens the control stream on `conn` and agrees on a version.
pub async fn open<C: Connection>(conn: C, name: &str) -> Result<Session<C>, SessionError> {
    open_with_version(conn, name, PROTOCOL_VERSION).await
}

/// As [`open`], announcing `version` (tests use it to play an old or a
/// future node).
pub async fn open_with_version<C: Connection>(
    conn: C,
    name: &str,
    version: u16,
) -> Result<Session<C>, SessionError> {
    let (send, recv) = conn.open_stream().await?;
    let mut writer = FrameWriter::new(send);
    let mut reader = FrameReader::new(recv);
    let hello = Hello {
        version,
        name: name.to_owned(),
    };
    writer.send_message(FrameKind::Hello, &hello).await?;
    match reader
        .read_message::<HelloReply>(FrameKind::HelloReply)
        .await?
    {
        HelloReply::Accepted { version } => Ok(Session {
            conn,
            writer,
            reader,
            version,
        }),
        HelloReply::Refused { reason } => Err(SessionError::VersionRefused(reason)),
    }
}

/// Accepts the control stream on `conn` and answers the peer's hello.
pub async fn accept<C: Connection>(conn: C) -> Result<Session<C>, SessionError> {
    let (send, recv) = conn.accept_stream().await?;
    let mut writer = FrameWriter::new(send);
    let mut reader = FrameReader::new(recv);
    let hello = reader.read_message::<Hello>(FrameKind::Hello).await?;
    let reply = version::reply_to(&hello);
    writer.send_message(FrameKind::HelloReply, &reply).await?;
    match reply {
        HelloReply::Accepted { version } => Ok(Session {
            conn,
            writer,
            reader,
            version,
        }),
        HelloReply::Refused { reason } => {
            // Let the refusal reach the peer before the connection goes: the
            // peer hangs up once it has read it.
            let _ = writer.finish();
            let _ = tokio::time::timeout(REFUSAL_LINGER, reader.next_header()).await;
            conn.close("protocol version refused");
            Err(SessionError::VersionRefused(reason))
        }
    }
}
