//! `ferry bench storage`: each storage method's copy rate next to a plain
//! sequential copy of the same file on the same file system (the physical
//! reference), and the disk workload's write latency during each move
//! next to its latency before.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use ferry_actors::disk::shared;
use ferry_actors::node::disk::{
    self, CopyProgress, DiskActor, DiskArgs, DiskMsg, DiskPlace, copy_until_converged,
};
use ferry_actors::storage::datastore::Datastores;
use ferry_actors::storage::target::LocalTarget;
use ferry_actors::storage::{Method, MoveOptions};
use ractor::Actor;

use crate::datastore::FileDatastores;

/// Options of `ferry bench storage`.
#[derive(Debug, Args)]
pub struct StorageArgs {
    /// Disk size in MiB (filled with non-zero data).
    #[arg(long, default_value_t = 1024)]
    pub size_mib: u64,
    /// Folder for the two datastores (default: the system's temp folder).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Runs per method; medians are reported.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Time the workload runs before each move, to measure its latency.
    #[arg(long, default_value_t = 1000)]
    pub baseline_ms: u64,
    /// Methods to run (default: all).
    #[arg(long, value_delimiter = ',')]
    pub methods: Vec<Method>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Plain copy with read and write through a 1 MiB buffer, then fdatasync.
fn plain_copy(from: &Path, to: &Path) -> anyhow::Result<f64> {
    let t = Instant::now();
    let mut src = std::fs::File::open(from)?;
    let mut dst = std::fs::File::create(to)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = src.read(&mut buf)?;
        if n == 0 {
            break;
        }
        dst.write_all(&buf[..n])?;
        bytes += n as u64;
    }
    dst.sync_data()?;
    let rate = bytes as f64 / t.elapsed().as_secs_f64() / 1e6;
    std::fs::remove_file(to)?;
    Ok(rate)
}

/// The copy `cp` makes on Linux: copy_file_range over the whole file.
fn kernel_copy(from: &Path, to: &Path) -> anyhow::Result<f64> {
    let t = Instant::now();
    let bytes = std::fs::copy(from, to)?;
    std::fs::File::options().write(true).open(to)?.sync_data()?;
    let rate = bytes as f64 / t.elapsed().as_secs_f64() / 1e6;
    std::fs::remove_file(to)?;
    Ok(rate)
}

fn fill(path: &Path, size_mib: u64) -> anyhow::Result<()> {
    let mut f = std::fs::File::create(path)?;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..size_mib {
        for w in buf.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&buf)?;
    }
    f.sync_all()?;
    Ok(())
}

struct MoveFigures {
    copy_mb_s: f64,
    latency_before_us: f64,
    latency_during_us: f64,
    pause_ms: f64,
}

async fn one_move(
    stores: Arc<FileDatastores>,
    from: &str,
    to: &str,
    method: Method,
    baseline: Duration,
) -> anyhow::Result<MoveFigures> {
    let path = "bench/disk0.raw";
    let d = stores.open_disk(from, path)?;
    let (actor, _) = Actor::spawn(
        None,
        DiskActor,
        DiskArgs {
            name: "disk0".into(),
            disk: shared(d),
            place: DiskPlace {
                datastore: from.into(),
                path: path.into(),
            },
            stores: stores.clone(),
            workload_acked: Arc::default(),
        },
    )
    .await?;
    let info = || disk::call(&actor, DiskMsg::Info);
    actor.cast(DiskMsg::Workload(Some(Duration::from_millis(1))))?;
    let _ = info().await?;
    tokio::time::sleep(baseline).await;
    let before = info().await?.write_latency_us_p50 as f64;
    let len = info().await?.len;
    let target = LocalTarget::create(stores.clone(), to, path, len).await?;
    let options = MoveOptions::new(method);
    disk::call(&actor, |reply| DiskMsg::StartMove {
        options,
        target: Box::new(target),
        to: DiskPlace {
            datastore: to.into(),
            path: path.into(),
        },
        reply,
    })
    .await??;
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut shown = u64::MAX;
    copy_until_converged(&actor, 0, |p: &CopyProgress| {
        if let CopyProgress::Copied { cursor, len, .. } = p {
            let tenth = cursor * 10 / (*len).max(1);
            if tty && tenth != shown {
                shown = tenth;
                eprint!("\r  {method}: {:>3}%", tenth * 10);
            }
        }
    })
    .await?;
    if tty {
        eprint!("\r              \r");
    }
    let during = info().await?.write_latency_us_p50 as f64;
    let report = disk::call(&actor, DiskMsg::Finish).await??;
    disk::call(&actor, DiskMsg::Commit).await??;
    actor.cast(DiskMsg::Workload(None))?;
    disk::call(&actor, DiskMsg::Release).await?;
    Ok(MoveFigures {
        copy_mb_s: report.copy_mb_per_s,
        latency_before_us: before,
        latency_during_us: during,
        pause_ms: report.pause_ms,
    })
}

/// Runs the benchmark.
pub fn run(args: &StorageArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.size_mib >= 16, "--size-mib must be at least 16");
    anyhow::ensure!(args.runs >= 1, "--runs must be at least 1");
    let base = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let root = tempfile::Builder::new()
        .prefix("ferry-bench-storage-")
        .tempdir_in(&base)
        .with_context(|| format!("a folder in {}", base.display()))?;
    let (a, b) = (root.path().join("a"), root.path().join("b"));
    for d in [&a, &b] {
        std::fs::create_dir_all(d.join("bench"))?;
    }
    let src = a.join("bench/disk0.raw");
    eprintln!(
        "filling a {} MiB disk in {} ...",
        args.size_mib,
        root.path().display()
    );
    fill(&src, args.size_mib)?;
    let mut plain = Vec::new();
    let mut kernel = Vec::new();
    for _ in 0..args.runs {
        plain.push(plain_copy(&src, &b.join("plain.raw"))?);
        kernel.push(kernel_copy(&src, &b.join("cp.raw"))?);
    }
    let (plain, kernel) = (median(plain), median(kernel));
    let reference = plain.max(kernel);
    println!("disk {} MiB on {}", args.size_mib, root.path().display());
    println!("plain copy (read/write 1 MiB + fdatasync): {plain:>7.0} MB/s");
    println!("kernel copy (copy_file_range, as cp):      {kernel:>7.0} MB/s");
    println!(
        "(\"vs best copy\": against the faster of the two; every rate counts until the copy is durable)"
    );
    println!(
        "{:<9} {:>9} {:>13} {:>16} {:>16} {:>9} {:>10}",
        "method",
        "MB/s",
        "vs best copy",
        "write p50 before",
        "write p50 during",
        "ratio",
        "pause ms"
    );
    let stores = Arc::new(FileDatastores::open(&[
        ("a".to_owned(), a.clone()),
        ("b".to_owned(), b.clone()),
    ])?);
    let methods = if args.methods.is_empty() {
        Method::ALL.to_vec()
    } else {
        args.methods.clone()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    // The disk moves back and forth between the two datastores.
    let mut here = ("a", "b");
    for method in methods {
        let mut figures = Vec::new();
        for _ in 0..args.runs {
            let f = rt.block_on(one_move(
                stores.clone(),
                here.0,
                here.1,
                method,
                Duration::from_millis(args.baseline_ms),
            ))?;
            here = (here.1, here.0);
            figures.push(f);
        }
        let rate = median(figures.iter().map(|f| f.copy_mb_s).collect());
        let before = median(figures.iter().map(|f| f.latency_before_us).collect());
        let during = median(figures.iter().map(|f| f.latency_during_us).collect());
        let pause = median(figures.iter().map(|f| f.pause_ms).collect());
        println!(
            "{:<9} {:>9.0} {:>12.0}% {:>13.0} us {:>13.0} us {:>8.2}x {:>10.2}",
            method.name(),
            rate,
            100.0 * rate / reference,
            before,
            during,
            during / before.max(1.0),
            pause
        );
    }
    Ok(())
}
