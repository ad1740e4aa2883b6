//! Several instances of one pipeline in one group, kept running as a supervisor would: a
//! member that exits by itself (non-zero: a fail-stop) is started again.

use std::time::Duration;

use super::*;

/// tansu's session timeout in the test pipelines is 6 s; a member that leaves and comes back
/// sooner may find its old session still in the group.
const SESSION: Duration = Duration::from_millis(6_500);

/// The members of one group, each with a name, a log per start (`<name>.log`, then
/// `<name>-<n>.log`) and its own metrics port.
pub struct Members<'a> {
    p: &'a TestPipeline,
    members: Vec<Member>,
    starts: usize,
}

struct Member {
    name: String,
    log: String,
    port: u16,
    process: KillOnDrop,
}

impl<'a> Members<'a> {
    /// Starts one member per name, each let into the group (its first assignment) before the
    /// next: tansu 0.6 wedges a group for good when a member leaves it in the middle of
    /// joining, which Apache Kafka does not.
    pub fn start(p: &'a TestPipeline, names: &[&str]) -> Self {
        let mut members = Self {
            p,
            members: Vec::new(),
            starts: 0,
        };
        for name in names {
            members.add(name);
        }
        members
    }

    /// Starts one more member, let into the group before this returns.
    pub fn add(&mut self, name: &str) {
        let member = self.spawn(name, format!("{name}.log"));
        self.members.push(member);
    }

    /// Starts a member and waits until the group has settled around it: its first assignment,
    /// and a new assignment in every other running member (their rejoin in the same
    /// rebalance), so that the next fault never hits a member in the middle of joining.
    fn spawn(&mut self, name: &str, log: String) -> Member {
        const ASSIGNED: &str = "Partitions assigned";
        self.starts += 1;
        let mut before: Vec<(String, usize)> = Vec::new();
        for m in self.members.iter_mut() {
            if m.name != name && matches!(m.process.0.try_wait(), Ok(None)) {
                before.push((m.log.clone(), self.p.log(&m.log).matches(ASSIGNED).count()));
            }
        }
        let port = free_port();
        let mut process = self.p.spawn_listening(&log, &format!("127.0.0.1:{port}"));
        if !self.p.log_within(&log, ASSIGNED, Duration::from_secs(60))
            && std::env::var("KAFKA_BOOTSTRAP").is_err()
        {
            // tansu may keep a group from finishing a rebalance around a member that left it
            // while joining; a second start, after the session timeout, settles it.
            eprintln!("{name} got no partitions in 60 s; starting it again");
            sigkill(&mut process.0);
            std::thread::sleep(SESSION);
            process = self.p.spawn_listening(&log, &format!("127.0.0.1:{port}"));
        }
        self.p.wait_for_log(&log, ASSIGNED);
        let started = std::time::Instant::now();
        for (other, seen) in before {
            while self.p.log(&other).matches(ASSIGNED).count() <= seen
                && started.elapsed() < Duration::from_secs(30)
            {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Member {
            name: name.to_owned(),
            log,
            port,
            process,
        }
    }

    fn respawn(&mut self, i: usize) {
        let name = self.members[i].name.clone();
        let log = format!("{name}-{}.log", self.starts);
        self.members[i] = self.spawn(&name, log);
    }

    pub fn count(&self) -> usize {
        self.members.len()
    }

    /// Member `i`'s metrics port (`/healthz`, `/readyz`).
    pub fn port(&self, i: usize) -> u16 {
        self.members[i].port
    }

    /// SIGKILL to member `i`, then a new one in its place.
    pub fn kill(&mut self, i: usize) {
        sigkill(&mut self.members[i].process.0);
        self.respawn(i);
    }

    /// SIGKILL to member `i`, for good.
    pub fn kill_for_good(&mut self, i: usize) {
        let mut gone = self.members.remove(i);
        sigkill(&mut gone.process.0);
    }

    /// SIGTERM to member `i`, which must exit within its grace period and hard deadline
    /// (20 s, and a margin), whatever it is doing; then a new one in its place. Returns how
    /// it exited.
    pub fn stop(&mut self, i: usize) -> std::process::ExitStatus {
        sigterm(&self.members[i].process.0);
        let status = wait_exit(&mut self.members[i].process.0, Duration::from_secs(30));
        eprintln!("{} stopped with {status}", self.members[i].name);
        self.respawn(i);
        status
    }

    /// A graceful leave and, after the session timeout, a new member in its place.
    fn roll(&mut self, i: usize) {
        let member = &mut self.members[i];
        eprintln!("not drained; a rolling restart of {}", member.name);
        self.p.stop(&mut member.process, &member.log);
        std::thread::sleep(SESSION);
        self.respawn(i);
    }

    /// Starts again every member that exited by itself, which must have exited non-zero (a
    /// fail-stop); returns how many.
    pub fn restart_exited(&mut self) -> usize {
        let mut restarted = 0;
        for i in 0..self.members.len() {
            let member = &mut self.members[i];
            if let Ok(Some(status)) = member.process.0.try_wait() {
                assert!(
                    !status.success(),
                    "{} stopped by itself with {status}:\n{}",
                    member.name,
                    self.p.log(&member.log)
                );
                eprintln!("{} exited with {status}; restarting it", member.name);
                self.respawn(i);
                restarted += 1;
            }
        }
        restarted
    }

    /// Waits until the group has committed the end of every partition, for up to `rounds`
    /// rounds of 30 s; after each round the members that exited are started again. tansu
    /// (unlike Apache Kafka) may keep a dead session's partitions assigned to it, so against
    /// tansu only, from the second round on, a member is restarted gracefully, which settles
    /// the group; a real broker must settle by itself.
    pub fn settle(&mut self, broker: &Broker, rounds: usize) {
        let tansu = std::env::var("KAFKA_BOOTSTRAP").is_err();
        for round in 0..rounds {
            if broker
                .wait_committed(&self.p.topic, &self.p.group, Duration::from_secs(30))
                .is_ok()
            {
                return;
            }
            let restarted = self.restart_exited();
            if round > 0 && restarted == 0 && tansu {
                self.roll(round % self.members.len());
            }
        }
    }

    /// SIGTERM to every member; each must exit 0.
    pub fn stop_all(&mut self) {
        for member in &mut self.members {
            self.p.stop(&mut member.process, &member.log);
        }
    }

    /// SIGTERM to every member; each must exit within its grace period, 0 or by a fail-stop
    /// whose one `ERROR` line contains `fail_stop` (what [`Self::settle`] also restarts).
    /// Returns how many fail-stopped.
    pub fn stop_all_allowing(&mut self, fail_stop: &str) -> usize {
        let mut stopped = 0;
        for member in &mut self.members {
            sigterm(&member.process.0);
            let status = wait_exit(&mut member.process.0, Duration::from_secs(30));
            if !status.success() {
                let log = self.p.log(&member.log);
                assert!(
                    log.lines()
                        .any(|l| l.contains("ERROR") && l.contains(fail_stop)),
                    "{} exited with {status} without a fail-stop on {fail_stop:?}:\n{log}",
                    member.name
                );
                eprintln!("{} fail-stopped at shutdown ({fail_stop})", member.name);
                stopped += 1;
            }
        }
        stopped
    }
}
