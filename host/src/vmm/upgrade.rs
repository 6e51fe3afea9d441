//! `vm upgrade`: a running guest moves to a fresh VMM process on the same
//! host without a page copied.
//!
//! The successor starts and makes a blank VM over the same memfd while the
//! guest still runs; only then is the guest paused, its vCPU and device
//! state handed across, and the successor resumed. The downtime is that
//! pause-to-resume span: two socket round trips and a state of a few
//! kilobytes, whatever the memory size. Until the successor runs, any
//! failure leaves the old VMM in charge and running again.

use std::time::Instant;

use ferry_actors::guest::{GuestError, UpgradeReport};

use super::client::{VmmGuest, ask};
use super::proto::{Boot, Request};

/// Replaces `guest`'s VMM process by a new one.
pub fn replace(guest: &mut VmmGuest) -> Result<UpgradeReport, GuestError> {
    let (name, home, vcpus, logging) = guest.parts();
    if logging {
        return Err(GuestError::Backend {
            op: "upgrade the VMM",
            reason: "the VM is migrating (its dirty log is on); upgrade it afterwards".into(),
        });
    }
    let (name, home) = (name.to_owned(), home.clone());
    let socket = home.socket(&name);
    let next = socket.with_extension("sock.next");
    let _ = std::fs::remove_file(&next);
    let memfd = guest.memfd()?;
    let (conn, pid) = guest.launch_successor(&next)?;
    let create = Request::Create {
        boot: Boot::Blank,
        vcpus,
        console_log: Some(home.console_log(&name)),
        // The state brings the guest's CPUID along.
        cpu_model: None,
        devices: guest.devices().clone(),
    };
    let abandon = |conn: &std::os::unix::net::UnixStream| {
        let _ = ask(conn, "quit", &Request::Quit, &[], None);
        let _ = std::fs::remove_file(&next);
    };
    let prepared = ask(&conn, "create the successor VM", &create, &[], Some(&memfd))
        .and_then(|_| guest.reconnect_disk(&next));
    if let Err(e) = prepared {
        abandon(&conn);
        return Err(e);
    }
    let old_pid = guest.pid();
    let was_running = ferry_actors::guest::GuestBackend::is_running(guest);
    let started = Instant::now();
    let handed = {
        let old = guest.control();
        hand_over(&old, &conn, was_running)
    };
    let downtime = started.elapsed();
    if let Err(e) = handed {
        abandon(&conn);
        if was_running {
            let _ = ask(&guest.control(), "resume", &Request::Resume, &[], None);
        }
        return Err(e);
    }
    // The successor runs the guest; the old VMM only has to go.
    let _ = ask(&guest.control(), "quit", &Request::Quit, &[], None);
    ask(
        &conn,
        "take the socket",
        &Request::MoveSocket(socket.clone()),
        &[],
        None,
    )?;
    guest.take_over(conn, pid);
    Ok(UpgradeReport {
        downtime,
        old_pid,
        new_pid: pid,
    })
}

/// Pauses the guest in `old`, moves its state to `new` and runs it there.
fn hand_over(
    old: &std::os::unix::net::UnixStream,
    new: &std::os::unix::net::UnixStream,
    resume: bool,
) -> Result<(), GuestError> {
    ask(old, "pause", &Request::Pause, &[], None)?;
    let (_, state) = ask(old, "save state", &Request::SaveState, &[], None)?;
    ask(new, "restore state", &Request::RestoreState, &state, None)?;
    if resume {
        ask(new, "resume", &Request::Resume, &[], None)?;
    }
    Ok(())
}
