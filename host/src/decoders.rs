//! Every decoder of bytes that come from outside a node, each as one
//! function over an arbitrary byte string: the surfaces the fuzz targets
//! (`fuzz/`) and the decoders' property test (`tests/decoders.rs`) drive.
//!
//! Each function answers [`Decoded::Accepted`] or [`Decoded::Refused`]; a
//! panic is a bug. What is accepted is checked further: a message decoded
//! and encoded again must decode to the same bytes, and a page or extent
//! batch must land inside its target.

use ferry_actors::migration::wire::{
    DestMsg, LaneMark, Ownership, Resolution, SourceMsg, StreamIntro,
};
use ferry_actors::node::client::{ClientReply, ClientRequest};
use ferry_actors::node::host::history::MigrationRecord;
use ferry_actors::ops::audit::AuditEntry;
use ferry_actors::ops::jobs::Job;
use ferry_actors::ops::store::{self, AdoptedFrom, StoredVm};
use ferry_actors::storage::remote::{DiskCmd, DiskOpen, DiskReply};
use ferry_transport::batch::{self, BatchKind, SliceSink};
use ferry_transport::frame::{FRAME_HEADER_BYTES, FrameHeader, FrameKind};
use ferry_transport::limits::PAGE_BYTES;
use ferry_transport::message::{WireDecode, WireEncode, decode_body};
use ferry_transport::version::{Hello, HelloReply};
use rkyv::api::high::{HighDeserializer, HighValidator};
use rkyv::bytecheck::CheckBytes;
use rkyv::rancor;

use crate::kvm::state::VmState;
use crate::node::config::{ClientConfig, NodeConfig};
use crate::vmm::proto;

/// What a decoder made of a byte string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoded {
    /// A valid value (checked further where it can be).
    Accepted,
    /// An error, as a decoder should answer to bytes that are not valid.
    Refused,
}

impl Decoded {
    fn of<T, E>(result: Result<T, E>) -> Self {
        match result {
            Ok(_) => Self::Accepted,
            Err(_) => Self::Refused,
        }
    }
}

/// A decoder surface: any bytes in, a verdict out.
pub type Decoder = fn(&[u8]) -> Decoded;

/// The decoders by name, as the fuzz targets and the property test use them.
pub const ALL: &[(&str, Decoder)] = &[
    ("frames", frames),
    ("control", control),
    ("batches", batches),
    ("client", client),
    ("stored", stored),
    ("vm_state", vm_state),
    ("config", config),
    ("vmm", vmm),
    ("certificate", certificate),
];

/// A frame as a stream delivers it: header, then a body of the kind the
/// header names (Hello, control message, page or extent batch).
pub fn frames(data: &[u8]) -> Decoded {
    let Some((head, body)) = data.split_first_chunk::<FRAME_HEADER_BYTES>() else {
        return Decoded::Refused;
    };
    let Ok(header) = FrameHeader::decode(head) else {
        return Decoded::Refused;
    };
    if header.body_len != body.len() {
        return Decoded::Refused;
    }
    match header.kind {
        FrameKind::Hello => wire::<Hello>(body),
        FrameKind::HelloReply => wire::<HelloReply>(body),
        FrameKind::Control => wire::<SourceMsg>(body),
        FrameKind::PageBatch => batch_into(BatchKind::Pages, body),
        FrameKind::ExtentBatch => batch_into(BatchKind::Extents, body),
        FrameKind::End => Decoded::Accepted,
    }
}

/// Control messages of the migration and session protocols; the first
/// byte picks the type.
pub fn control(data: &[u8]) -> Decoded {
    let Some((which, body)) = data.split_first() else {
        return Decoded::Refused;
    };
    match which % 8 {
        0 => wire::<SourceMsg>(body),
        1 => wire::<DestMsg>(body),
        2 => wire::<StreamIntro>(body),
        3 => wire::<Resolution>(body),
        4 => wire::<Ownership>(body),
        5 => wire::<LaneMark>(body),
        6 => wire::<Hello>(body),
        _ => wire::<HelloReply>(body),
    }
}

/// A page or extent batch body (first byte picks the kind), applied to a
/// small target that refuses what lies outside it.
pub fn batches(data: &[u8]) -> Decoded {
    let Some((which, body)) = data.split_first() else {
        return Decoded::Refused;
    };
    let kind = if which % 2 == 0 {
        BatchKind::Pages
    } else {
        BatchKind::Extents
    };
    batch_into(kind, body)
}

/// The client protocol and the remote-disk protocol (first byte picks).
pub fn client(data: &[u8]) -> Decoded {
    let Some((which, body)) = data.split_first() else {
        return Decoded::Refused;
    };
    match which % 5 {
        0 => wire::<ClientRequest>(body),
        1 => wire::<ClientReply>(body),
        2 => wire::<DiskOpen>(body),
        3 => wire::<DiskCmd>(body),
        _ => wire::<DiskReply>(body),
    }
}

/// Records read back from a node's state database (first byte picks).
pub fn stored(data: &[u8]) -> Decoded {
    let Some((which, body)) = data.split_first() else {
        return Decoded::Refused;
    };
    match which % 5 {
        0 => record::<StoredVm>(body),
        1 => record::<Job>(body),
        2 => record::<MigrationRecord>(body),
        3 => record::<AdoptedFrom>(body),
        _ => record::<AuditEntry>(body),
    }
}

/// A KVM VM's saved state, as a destination or a successor VMM reads it.
pub fn vm_state(data: &[u8]) -> Decoded {
    let Ok(state) = VmState::from_bytes(data) else {
        return Decoded::Refused;
    };
    let again = state.to_bytes();
    let state = VmState::from_bytes(&again).expect("re-encoded VM state decodes");
    assert_eq!(state.to_bytes(), again, "VM state encodes stably");
    Decoded::Accepted
}

/// Node and client files (first byte picks), parsed and checked.
pub fn config(data: &[u8]) -> Decoded {
    let Some((which, text)) = data.split_first() else {
        return Decoded::Refused;
    };
    let Ok(text) = std::str::from_utf8(text) else {
        return Decoded::Refused;
    };
    if which % 2 == 0 {
        Decoded::of(NodeConfig::parse(text))
    } else {
        Decoded::of(ClientConfig::parse(text))
    }
}

/// Frames on a VMM's socket, both ways, and on its disk channel.
pub fn vmm(data: &[u8]) -> Decoded {
    let Some((which, frame)) = data.split_first() else {
        return Decoded::Refused;
    };
    match which % 4 {
        0 => Decoded::of(proto::decode_frame::<proto::Request>(frame)),
        1 => Decoded::of(proto::decode_frame::<proto::Reply>(frame)),
        2 => Decoded::of(proto::decode_frame::<proto::DiskRequest>(frame)),
        _ => Decoded::of(proto::decode_frame::<proto::DiskReply>(frame)),
    }
}

/// A peer's certificate, as the TLS handshake hands it over.
pub fn certificate(data: &[u8]) -> Decoded {
    Decoded::of(ferry_transport::identity::identity_from_der(data))
}

fn wire<T>(body: &[u8]) -> Decoded
where
    T: WireEncode + WireDecode,
    T::Archived: for<'a> CheckBytes<HighValidator<'a, rancor::Error>>
        + rkyv::Deserialize<T, HighDeserializer<rancor::Error>>,
{
    let Ok(value) = decode_body::<T>(body) else {
        return Decoded::Refused;
    };
    let again = encode(&value);
    let value = decode_body::<T>(&again).expect("a re-encoded message decodes");
    assert_eq!(encode(&value), again, "a message encodes stably");
    Decoded::Accepted
}

fn record<T>(bytes: &[u8]) -> Decoded
where
    T: WireEncode + WireDecode,
    T::Archived: for<'a> CheckBytes<HighValidator<'a, rancor::Error>>
        + rkyv::Deserialize<T, HighDeserializer<rancor::Error>>,
{
    let Ok(value) = store::decode::<T>(bytes) else {
        return Decoded::Refused;
    };
    let again = store::encode(&value).expect("a decoded record encodes");
    let value = store::decode::<T>(&again).expect("a re-encoded record decodes");
    assert_eq!(
        store::encode(&value).expect("encodes"),
        again,
        "a record encodes stably"
    );
    Decoded::Accepted
}

fn encode<T: WireEncode>(value: &T) -> Vec<u8> {
    rkyv::to_bytes::<rancor::Error>(value)
        .expect("a decoded message encodes")
        .to_vec()
}

/// Pages of the small target a batch is applied to.
const TARGET_PAGES: usize = 16;

fn batch_into(kind: BatchKind, body: &[u8]) -> Decoded {
    let Ok((table, data)) = batch::parse_body(kind, body) else {
        return Decoded::Refused;
    };
    assert_eq!(data.len(), table.data_len, "data length checked");
    let mut memory = vec![0u8; TARGET_PAGES * PAGE_BYTES];
    let mut sink = match kind {
        BatchKind::Pages => SliceSink::pages(&mut memory),
        BatchKind::Extents => SliceSink::extents(&mut memory),
    };
    Decoded::of(batch::apply(&table, data, &mut sink))
}

/// Valid inputs for each decoder: the fuzz targets' seed corpus
/// (`fuzz/seeds/TARGET/NAME`) and the property test's starting points.
pub fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut add = |target: &'static str, name: &str, bytes: Vec<u8>| {
        out.push((target, name.to_owned(), bytes));
    };
    for (name, bytes) in control_seeds() {
        add("control", &name, bytes);
    }
    for (name, bytes) in client_seeds() {
        add("client", &name, bytes);
    }
    for (name, bytes) in stored_seeds() {
        add("stored", &name, bytes);
    }
    for (name, bytes) in batch_seeds() {
        add("batches", &name, bytes);
    }
    for (name, bytes) in frame_seeds() {
        add("frames", &name, bytes);
    }
    add("vm_state", "two_vcpus", sample_vm_state().to_bytes());
    add("config", "node", tagged(0, NODE_FILE.as_bytes()));
    add("config", "client", tagged(1, CLIENT_FILE.as_bytes()));
    for (name, bytes) in vmm_seeds() {
        add("vmm", &name, bytes);
    }
    add("certificate", "host", sample_certificate());
    out
}

/// A host's certificate as DER (freshly signed: it differs on each call).
fn sample_certificate() -> Vec<u8> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let ca = ferry_transport::pki::ClusterCa::generate("seed").expect("a CA");
    let issued = ca
        .issue("host-a", ferry_transport::Role::Host)
        .expect("a certificate");
    CertificateDer::from_pem_slice(issued.cert_pem.as_bytes())
        .expect("PEM")
        .to_vec()
}

fn tagged(which: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![which];
    out.extend_from_slice(body);
    out
}

fn sample_vm() -> ferry_actors::migration::wire::VmConfig {
    use ferry_actors::migration::wire::{DiskConfig, GuestKind, VmConfig};
    VmConfig {
        name: "web-1".into(),
        memory_bytes: 256 << 20,
        vcpus: 2,
        cpu_features: vec!["sse4_2".into(), "avx2".into()],
        mac: [0x52, 0x54, 0, 1, 2, 3],
        kind: GuestKind::Kvm {
            wss_bytes: 64 << 20,
        },
        disks: vec![DiskConfig {
            name: "root".into(),
            len_bytes: 1 << 30,
            datastore: "ds1".into(),
            path: "web-1/root.raw".into(),
            location: "/srv/ds1".into(),
            workload: false,
        }],
    }
}

fn control_seeds() -> Vec<(String, Vec<u8>)> {
    use ferry_actors::migration::wire::{Offer, Refusal};
    let offer = SourceMsg::Offer(Box::new(Offer {
        migration_id: 7,
        vm: sample_vm(),
        generation: 3,
        cold: false,
        lanes: 2,
        verify_memory: true,
        storage: None,
        trace_parent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
    }));
    let switchover = SourceMsg::Switchover {
        final_round: 4,
        state: vec![1, 2, 3, 4],
    };
    vec![
        ("offer".into(), tagged(0, &encode(&offer))),
        ("switchover".into(), tagged(0, &encode(&switchover))),
        (
            "refused".into(),
            tagged(
                1,
                &encode(&DestMsg::Refused(Refusal::MissingCpuFeatures(vec![
                    "avx512f".into(),
                ]))),
            ),
        ),
        (
            "round_received".into(),
            tagged(
                1,
                &encode(&DestMsg::RoundReceived {
                    round: 2,
                    pages: 100,
                    bytes: 409_600,
                }),
            ),
        ),
        (
            "intro_lane".into(),
            tagged(
                2,
                &encode(&StreamIntro::Lane {
                    migration_id: 7,
                    lane: 1,
                }),
            ),
        ),
        (
            "resolution".into(),
            tagged(3, &encode(&Resolution { committed: true })),
        ),
        ("ownership".into(), tagged(4, &encode(&Ownership::NotYet))),
        (
            "lane_mark".into(),
            tagged(5, &encode(&LaneMark { round: 1, pages: 9 })),
        ),
        (
            "hello".into(),
            tagged(
                6,
                &encode(&Hello {
                    version: 1,
                    name: "host-a".into(),
                }),
            ),
        ),
        (
            "hello_reply".into(),
            tagged(7, &encode(&HelloReply::Accepted { version: 1 })),
        ),
    ]
}

fn client_seeds() -> Vec<(String, Vec<u8>)> {
    use ferry_actors::node::client::MigrateOptions;
    use ferry_actors::storage::remote::HomeFile;
    let migrate = ClientRequest::Migrate {
        vm: "web-1".into(),
        to: "host-b".into(),
        options: MigrateOptions::default(),
    };
    let open = DiskOpen {
        migration_id: 7,
        disk: "root".into(),
        len: 1 << 30,
        datastore: "ds2".into(),
        path: "web-1/root.raw".into(),
        home: vec![HomeFile {
            path: "web-1/vm.toml".into(),
            bytes: b"name = \"web-1\"\n".to_vec(),
        }],
    };
    vec![
        ("migrate".into(), tagged(0, &encode(&migrate))),
        ("list".into(), tagged(0, &encode(&ClientRequest::ListVms))),
        (
            "error".into(),
            tagged(1, &encode(&ClientReply::Error("no such VM".into()))),
        ),
        (
            "macs".into(),
            tagged(
                1,
                &encode(&ClientReply::Macs(vec![(
                    "52:54:00:01:02:03".into(),
                    "host-a".into(),
                )])),
            ),
        ),
        ("disk_open".into(), tagged(2, &encode(&open))),
        (
            "disk_flush".into(),
            tagged(3, &encode(&DiskCmd::Flush { id: 5 })),
        ),
        (
            "disk_opened".into(),
            tagged(4, &encode(&DiskReply::Opened { durable: 5 })),
        ),
    ]
}

fn stored_seeds() -> Vec<(String, Vec<u8>)> {
    let vm = StoredVm {
        config: sample_vm(),
        generation: 3,
        running: true,
        leaving: Some(("host-b".into(), 7)),
    };
    let adopted = AdoptedFrom {
        peer: "host-a".into(),
        migration_id: 7,
    };
    let audit = AuditEntry {
        at_unix_ms: 1_796_000_000_000,
        node: "host-a".into(),
        who: "admin".into(),
        action: "migrate".into(),
        vm: "web-1".into(),
        to: "host-b".into(),
        downtime_ms: Some(12.5),
        outcome: "ok".into(),
        ..AuditEntry::default()
    };
    let migration = MigrationRecord {
        id: 7,
        vm: "web-1".into(),
        from: "host-a".into(),
        to: "host-b".into(),
        source: None,
        destination: None,
    };
    let encoded = |v: Result<Vec<u8>, store::StoreError>| v.expect("a seed encodes");
    vec![
        ("vm".into(), tagged(0, &encoded(store::encode(&vm)))),
        (
            "migration".into(),
            tagged(2, &encoded(store::encode(&migration))),
        ),
        (
            "adopted".into(),
            tagged(3, &encoded(store::encode(&adopted))),
        ),
        ("audit".into(), tagged(4, &encoded(store::encode(&audit)))),
    ]
}

fn batch_body(kind: BatchKind) -> Vec<u8> {
    let mut b = batch::BatchBuilder::new(kind);
    let page = vec![0x5a; PAGE_BYTES];
    match kind {
        BatchKind::Pages => {
            b.push_page(1, &page);
            b.push_nonzero_page_with(2, |p| {
                p.fill(0);
                Ok::<(), ()>(())
            })
            .expect("a zero page");
        }
        BatchKind::Extents => {
            b.push_extent(8192, &page[..512]);
            b.push_zero_extent(0, PAGE_BYTES);
        }
    }
    let encoded = b.finish();
    let mut bytes = encoded.head[FRAME_HEADER_BYTES..].to_vec();
    bytes.extend_from_slice(&encoded.data);
    bytes
}

fn batch_seeds() -> Vec<(String, Vec<u8>)> {
    vec![
        ("pages".into(), tagged(0, &batch_body(BatchKind::Pages))),
        ("extents".into(), tagged(1, &batch_body(BatchKind::Extents))),
    ]
}

fn frame(kind: FrameKind, body: &[u8]) -> Vec<u8> {
    let mut out = FrameHeader::new(kind, body.len()).encode().to_vec();
    out.extend_from_slice(body);
    out
}

fn frame_seeds() -> Vec<(String, Vec<u8>)> {
    let hello = Hello {
        version: 1,
        name: "host-a".into(),
    };
    let commit = SourceMsg::Commit { generation: 4 };
    vec![
        ("hello".into(), frame(FrameKind::Hello, &encode(&hello))),
        ("commit".into(), frame(FrameKind::Control, &encode(&commit))),
        (
            "pages".into(),
            frame(FrameKind::PageBatch, &batch_body(BatchKind::Pages)),
        ),
        (
            "extents".into(),
            frame(FrameKind::ExtentBatch, &batch_body(BatchKind::Extents)),
        ),
        ("end".into(), frame(FrameKind::End, &[])),
    ]
}

fn vmm_frame<T: serde::Serialize>(which: u8, header: &T, payload: &[u8]) -> Vec<u8> {
    let header = serde_json::to_vec(header).expect("a seed encodes");
    let mut out = vec![which];
    for len in [header.len(), payload.len()] {
        out.extend_from_slice(&u32::try_from(len).expect("small").to_le_bytes());
    }
    out.extend_from_slice(&header);
    out.extend_from_slice(payload);
    out
}

fn vmm_seeds() -> Vec<(String, Vec<u8>)> {
    vec![
        (
            "throttle".into(),
            vmm_frame(0, &proto::Request::Throttle(40), &[]),
        ),
        (
            "restore".into(),
            vmm_frame(0, &proto::Request::RestoreState, &[7; 64]),
        ),
        ("done".into(), vmm_frame(1, &proto::Reply::Done, &[])),
        (
            "disk_write".into(),
            vmm_frame(
                2,
                &proto::DiskRequest::Write {
                    offset: 4096,
                    seq: Some(9),
                },
                &[1; 512],
            ),
        ),
        (
            "disk_read".into(),
            vmm_frame(
                2,
                &proto::DiskRequest::Read {
                    offset: 8192,
                    len: 4096,
                },
                &[],
            ),
        ),
        (
            "block_channel".into(),
            vmm_frame(0, &proto::Request::Block { index: 1 }, &[]),
        ),
        (
            "disk_written".into(),
            vmm_frame(3, &proto::DiskReply::Done, &[]),
        ),
    ]
}

fn sample_vm_state() -> VmState {
    use crate::kvm::state::{STATE_VERSION, VcpuState};
    let vcpu = |id: u8| VcpuState {
        regs: vec![id; 144],
        sregs: vec![0; 312],
        fpu: vec![0; 416],
        xsave: vec![0; 4096],
        xsave_extra: Vec::new(),
        tsc_khz: 2_000_000,
        xcrs: vec![0; 392],
        debugregs: vec![0; 128],
        lapic: vec![0; 1024],
        msrs: vec![(0x10, 123_456), (0x6e0, 0)],
        events: vec![0; 64],
        mp_state: vec![0; 4],
        cpuid: vec![0; 40],
    };
    VmState {
        version: STATE_VERSION,
        memory_bytes: 256 << 20,
        vcpus: vec![vcpu(0), vcpu(1)],
        pic_master: vec![0; 32],
        pic_slave: vec![0; 32],
        ioapic: vec![0; 200],
        pit: vec![0; 112],
        clock: vec![0; 48],
        console: vec![0; 9],
        console_tail: b"login: ".to_vec(),
        virtio: vec![crate::virtio::mmio::TransportSnapshot {
            status: 15,
            driver_features: 1 << 32,
            queues: vec![crate::virtio::mmio::QueueSnapshot {
                size: 128,
                ready: true,
                desc_table: 0x10_0000,
                avail_ring: 0x10_1000,
                used_ring: 0x10_2000,
                next_avail: 7,
                next_used: 7,
            }],
            ..Default::default()
        }],
    }
}

const NODE_FILE: &str = r#"name = "host-a"
listen = "127.0.0.1:7701"
ca = "ca.pem"
cert = "host-a.pem"
key = "host-a.key"
memory_pool_mib = [512]

[capacity]
memory_mib = 8192
vcpus = 8

[[datastores]]
name = "ds1"
path = "ds1"

[[peers]]
name = "host-b"
addr = "127.0.0.1:7702"
"#;

const CLIENT_FILE: &str = r#"ca = "ca.pem"
cert = "admin.pem"
key = "admin.key"

[[nodes]]
name = "host-a"
addr = "127.0.0.1:7701"
"#;
