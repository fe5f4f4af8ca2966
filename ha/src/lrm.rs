//! The local resource manager: whether this node holds its lease (and so may run HA guests),
//! when it must fence itself, and what to do with each HA guest bound to it — start, restart
//! in place after a crash (up to `max_restart`), give up so the CRM relocates it, or stop it
//! for a migration the CRM asked for.

use crate::crm::LrmReport;
use crate::{Ms, Profile};

/// What the LRM's clock says about the lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fencing {
    /// Nothing changed.
    Steady,
    /// The self-fence deadline passed: stop every HA guest now.
    SelfFence,
    /// A renewal went through after a self-fence: HA guests may start again.
    Rejoined,
}

#[derive(Clone, Debug)]
pub struct Lrm {
    profile: Profile,
    /// Send time of the last renewal the API server accepted.
    last_ok: Option<Ms>,
    fenced: bool,
}

impl Lrm {
    /// `last_ok`: the last accepted renewal of a previous run of this agent (kept on disk),
    /// so a restarted agent neither fences guests it adopts nor starts any without a lease.
    pub fn new(profile: Profile, last_ok: Option<Ms>) -> Lrm {
        Lrm { profile, last_ok, fenced: false }
    }

    pub fn profile(&self) -> Profile {
        self.profile
    }

    /// A renewal sent at `sent_at` was accepted. The time it was *sent* counts: the server may
    /// have seen it any time after.
    pub fn renewed(&mut self, sent_at: Ms) {
        self.last_ok = Some(self.last_ok.map_or(sent_at, |t| t.max(sent_at)));
    }

    pub fn last_ok(&self) -> Option<Ms> {
        self.last_ok
    }

    /// Whether this node holds its lease at `now`: HA guests may run (and start).
    pub fn holds_lease(&self, now: Ms) -> bool {
        self.last_ok.is_some_and(|t| now < t + self.profile.fence)
    }

    pub fn fenced(&self) -> bool {
        self.fenced
    }

    /// Checks the deadline at `now`.
    pub fn tick(&mut self, now: Ms) -> Fencing {
        let holds = self.holds_lease(now);
        if !holds && !self.fenced {
            self.fenced = true;
            Fencing::SelfFence
        } else if holds && self.fenced {
            self.fenced = false;
            Fencing::Rejoined
        } else {
            Fencing::Steady
        }
    }
}

/// What to do with one HA guest bound to this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    Nothing,
    Start,
    /// Start again after it crashed or failed to start (counted).
    Restart,
    Stop,
    /// Restarts exhausted: leave it stopped and report failed, so the CRM relocates it.
    GiveUp,
    /// Stop it for migration `id`, then report that.
    StopFor(u64),
}

/// The guest as the LRM sees it.
#[derive(Clone, Debug)]
pub struct GuestView<'a> {
    /// The HA state asks for it to run (started, and not in error or disabled).
    pub want_running: bool,
    pub running: bool,
    pub max_restart: u32,
    /// The migration the CRM asked for, if any.
    pub migrate: Option<u64>,
    /// This node's earlier report on it (None, or another node's: a fresh start here).
    pub report: Option<&'a LrmReport>,
    /// This node stopped it in a self-fence: starting it again is not a restart.
    pub fenced: bool,
    /// This run of the agent (see [`LrmReport::epoch`]).
    pub epoch: u64,
}

/// Decides one guest's step and the report to write after it. `may_start`: the node holds its
/// lease (and the agent has just confirmed the binding with the server).
pub fn step(node: &str, g: &GuestView<'_>, may_start: bool) -> (Step, LrmReport) {
    let mut report = g
        .report
        .filter(|r| r.node == node)
        .cloned()
        .unwrap_or_else(|| LrmReport { node: node.to_string(), ..LrmReport::default() });
    if report.epoch != g.epoch {
        report.epoch = g.epoch;
        report.started = false;
    }
    if let Some(id) = g.migrate {
        if g.running {
            return (Step::StopFor(id), report);
        }
        report.stopped_for = Some(id);
        return (Step::Nothing, report);
    }
    if !g.want_running {
        report.restarts = 0;
        report.failed = false;
        report.started = false;
        return (if g.running { Step::Stop } else { Step::Nothing }, report);
    }
    if g.running {
        if !may_start {
            // No lease (or a start raced the self-fence): it must not run here.
            return (Step::Stop, report);
        }
        report.started = true;
        return (Step::Nothing, report);
    }
    if report.failed || !may_start {
        return (Step::Nothing, report);
    }
    if g.fenced {
        report.started = false;
    }
    if report.started {
        // It ran here (or a start was tried) and is not running: a crash or a failed start.
        if report.restarts >= g.max_restart {
            report.failed = true;
            return (Step::GiveUp, report);
        }
        report.restarts += 1;
        return (Step::Restart, report);
    }
    report.started = true;
    (Step::Start, report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lease_is_held_until_the_fence_deadline_and_regained_by_a_renewal() {
        let mut lrm = Lrm::new(Profile::FAST, None);
        assert!(!lrm.holds_lease(0), "no renewal yet: no HA guest may start");
        lrm.renewed(1_000);
        assert_eq!(lrm.tick(1_000), Fencing::Steady);
        assert!(lrm.holds_lease(5_999));
        assert_eq!(lrm.tick(6_000), Fencing::SelfFence);
        assert_eq!(lrm.tick(7_000), Fencing::Steady, "fences once");
        lrm.renewed(500);
        assert!(!lrm.holds_lease(7_000), "an older renewal does not count");
        lrm.renewed(7_000);
        assert_eq!(lrm.tick(7_100), Fencing::Rejoined);
    }

    #[test]
    fn restarts_are_counted_and_exhausted() {
        let view = |running, report| GuestView {
            want_running: true,
            running,
            max_restart: 1,
            migrate: None,
            report,
            fenced: false,
            epoch: 1,
        };
        let (s, r) = step("n1", &view(false, None), true);
        assert_eq!((s, r.started, r.restarts), (Step::Start, true, 0));
        let (s, r) = step("n1", &view(false, Some(&r)), true);
        assert_eq!((s, r.restarts), (Step::Restart, 1));
        let (s, r) = step("n1", &view(false, Some(&r)), true);
        assert_eq!((s, r.failed), (Step::GiveUp, true));
        let (s, _) = step("n1", &view(false, Some(&r)), true);
        assert_eq!(s, Step::Nothing, "gave up: waits for the CRM");
        // Another node's report is not ours: a fresh start.
        let (s, r) = step("n2", &view(false, Some(&r)), true);
        assert_eq!((s, r.node.as_str(), r.restarts), (Step::Start, "n2", 0));
        let (s, _) = step("n2", &view(false, None), false);
        assert_eq!(s, Step::Nothing, "no lease: no start");
    }
}
