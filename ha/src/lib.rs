//! kpve's HA decision logic: the cluster resource manager ([`crm`], in the controllers) and the
//! local resource manager ([`lrm`], in each node agent), as pure functions of what they observe
//! and the time. Nothing here reads a clock or talks to the API, so the same code runs in the
//! real processes and under the simulated clock of [`sim`], whose scenario suite
//! (`ha/scenarios/`) pins the decisions the way pve-ha-manager's regression tests do.
//!
//! The safety argument (never two running copies) rests on three rules:
//! 1. A node's LRM stops every HA guest it runs once it has not renewed its lease for
//!    [`Profile::fence`] (self-fence; a watchdog process does the same when the agent itself is
//!    dead), and starts none while it does not hold the lease.
//! 2. The CRM moves an HA guest off a node without that node's consent only after the node's
//!    lease has not been seen renewed for the whole lease duration, which is longer than the
//!    self-fence deadline plus a margin ([`Profile::check`]). Lease age is measured on the CRM's
//!    own clock from the moment it saw a renewal, so clock skew only makes it later.
//! 3. Every other move (maintenance, failback, an explicit migration) waits until the current
//!    node has said it stopped the guest for that move.

pub mod crm;
pub mod lrm;
pub mod sim;

/// Milliseconds: simulated time in [`sim`], wall-clock Unix milliseconds in the real processes.
pub type Ms = u64;

/// Timing of one cluster: how long a lease lasts, how often it is renewed, and when a node
/// that could not renew fences itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Profile {
    /// Lease duration: the CRM recovers a node's guests once it has not seen a renewal for this long.
    pub lease: Ms,
    /// How often the LRM renews its lease.
    pub renew: Ms,
    /// How long after its last accepted renewal the LRM stops its HA guests.
    pub fence: Ms,
}

/// The least time between a node's self-fence deadline and its lease expiry.
pub const MARGIN: Ms = 2_000;

impl Profile {
    /// Recovery in under a minute with room for slow API servers and loaded hosts.
    pub const DEFAULT: Profile = Profile { lease: 40_000, renew: 5_000, fence: 30_000 };
    /// Recovery in about ten seconds, for clusters on a reliable network.
    pub const FAST: Profile = Profile { lease: 8_000, renew: 1_000, fence: 5_000 };

    pub fn by_name(name: &str) -> Option<Profile> {
        match name {
            "default" => Some(Profile::DEFAULT),
            "fast" => Some(Profile::FAST),
            _ => None,
        }
    }

    /// The invariants the safety argument needs, checked when an agent starts.
    pub fn check(&self) -> Result<(), String> {
        if self.lease <= self.fence + MARGIN {
            return Err(format!(
                "the lease ({} ms) must outlast the self-fence deadline ({} ms) by more than {MARGIN} ms",
                self.lease, self.fence
            ));
        }
        if self.renew == 0 || self.renew * 2 > self.fence {
            return Err(format!(
                "renewals every {} ms: two must fit in the self-fence deadline ({} ms)",
                self.renew, self.fence
            ));
        }
        Ok(())
    }
}

/// Seconds with one decimal, as the logs and events print durations.
pub fn secs(ms: Ms) -> String {
    format!("{}.{} s", ms / 1000, (ms % 1000) / 100)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_profiles_are_safe_and_a_short_lease_is_refused() {
        Profile::DEFAULT.check().unwrap();
        Profile::FAST.check().unwrap();
        let bad = Profile { lease: 6_000, renew: 1_000, fence: 5_000 };
        assert!(bad.check().unwrap_err().contains("must outlast"));
        let slow = Profile { lease: 40_000, renew: 20_000, fence: 30_000 };
        assert!(slow.check().unwrap_err().contains("two must fit"));
    }
}
