//! How a node makes guests: booted ones for `vm create`, blank shadows for
//! incoming migrations.

use crate::guest::{GuestBackend, GuestError};
use crate::migration::{GuestKind, VmConfig};
use crate::synthetic::{SyntheticGuest, SyntheticParams};

/// Makes guest backends of the kinds this host supports.
pub trait GuestFactory: Send + Sync + 'static {
    /// A guest for `config`, booted into its workload, vCPUs paused.
    fn boot(&self, config: &VmConfig) -> Result<Box<dyn GuestBackend>, GuestError>;

    /// A blank, paused guest for an incoming migration of `config`. Its
    /// memory reads as zero; preparing it (faulting it in) may go on in
    /// the background while pages arrive.
    fn shadow(&self, config: &VmConfig) -> Result<Box<dyn GuestBackend>, GuestError>;

    /// Whether KVM guests can be made here.
    fn kvm(&self) -> bool;

    /// The guest of `config` that still runs from before this node
    /// started (its VMM process outlived the previous node), taken up
    /// again as it is. [`Reattach::NotKept`] for guests that live inside
    /// the node and so end with it.
    fn reattach(&self, config: &VmConfig) -> Reattach {
        let _ = config;
        Reattach::NotKept
    }
}

/// What [`GuestFactory::reattach`] found.
pub enum Reattach {
    /// The guest ran on; here it is.
    Running(Box<dyn GuestBackend>),
    /// Guests of this kind end with the node: boot it again.
    NotKept,
    /// The guest should have run on but is gone: it crashed (why).
    Lost(String),
}

/// Makes synthetic guests only.
#[derive(Debug, Clone, Copy, Default)]
pub struct SyntheticFactory;

impl SyntheticFactory {
    fn params(config: &VmConfig) -> Result<SyntheticParams, GuestError> {
        match config.kind {
            GuestKind::Synthetic {
                wss_bytes,
                seed,
                writes_per_sec,
            } => {
                let p = SyntheticParams {
                    memory_bytes: config.memory_bytes,
                    wss_bytes,
                    seed,
                    writes_per_sec,
                };
                SyntheticGuest::check(&p).map_err(|e| GuestError::BadState(e.to_owned()))?;
                Ok(p)
            }
            GuestKind::Kvm { .. } | GuestKind::Linux { .. } => Err(GuestError::Backend {
                op: "create guest",
                reason: "this host makes synthetic guests only".into(),
            }),
        }
    }
}

impl GuestFactory for SyntheticFactory {
    fn boot(&self, config: &VmConfig) -> Result<Box<dyn GuestBackend>, GuestError> {
        let mut g = SyntheticGuest::booted(Self::params(config)?);
        g.pause()?;
        Ok(Box::new(g))
    }

    fn shadow(&self, config: &VmConfig) -> Result<Box<dyn GuestBackend>, GuestError> {
        Ok(Box::new(SyntheticGuest::blank(Self::params(config)?)))
    }

    fn kvm(&self) -> bool {
        false
    }
}
