//! The source's copies of a VM whose disks were copied away.
//!
//! A migration that copies the disks deletes the source's files at its
//! commit. When the source does not live to see that commit (it restarts
//! and learns the end by asking), the files would stay behind. So before
//! the offer the source records durably that this migration copies
//! (`copying/<vm>/<id>` setting), and whoever learns that the VM moved
//! removes the files the record names. A migration that shares its
//! datastore never has the record: its files are the destination's now.

use ferry_transport::Transport;

use super::HostState;
use crate::migration::VmConfig;
use crate::node::NodeError;

fn key(vm: &str, migration_id: u64) -> String {
    format!("copying/{vm}/{migration_id}")
}

/// Records that migration `migration_id` copies `vm`'s disks away.
pub(super) fn record<T: Transport>(
    s: &mut HostState<T>,
    vm: &str,
    migration_id: u64,
) -> Result<(), NodeError> {
    let key = key(vm, migration_id);
    s.write_store(|store| store.set_setting(&key, "1"))?;
    s.copying.insert(key);
    Ok(())
}

/// Migration `migration_id` of `vm` ended with the VM still here, or
/// with its own commit removing the copies: the record goes.
pub(super) fn forget<T: Transport>(s: &mut HostState<T>, vm: &str, migration_id: u64) {
    let key = key(vm, migration_id);
    if s.copying.remove(&key)
        && let Err(e) = s.write_store(|store| store.set_setting(&key, ""))
    {
        tracing::warn!(%vm, "clearing the copy record: {e}");
    }
}

/// `config`'s VM moved away by migration `migration_id` while this host
/// could not commit it: if that migration copied the disks, the files
/// left here (disks, overlays, home) are removed, then the record.
pub(super) async fn remove_copies<T: Transport>(
    s: &mut HostState<T>,
    config: &VmConfig,
    migration_id: u64,
) {
    if !s.copying.contains(&key(&config.name, migration_id)) {
        return;
    }
    let stores = s.stores.clone();
    let vm = config.name.clone();
    let datastores: std::collections::BTreeSet<String> =
        config.disks.iter().map(|d| d.datastore.clone()).collect();
    crate::node::offload(move || {
        for ds in datastores {
            for path in stores.list(&ds, &vm).unwrap_or_default() {
                if let Err(e) = stores.remove(&ds, &path) {
                    tracing::warn!(%vm, %ds, %path, "removing a copy left behind: {e}");
                }
            }
        }
    })
    .await;
    forget(s, &config.name, migration_id);
}

/// The copy records kept in the settings.
pub(super) fn load(
    settings: &std::collections::BTreeMap<String, String>,
) -> std::collections::BTreeSet<String> {
    settings
        .iter()
        .filter(|(k, v)| k.starts_with("copying/") && v.as_str() == "1")
        .map(|(k, _)| k.clone())
        .collect()
}
