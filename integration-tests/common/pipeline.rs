//! A pipeline for one test: its TOML file, topics, group and output folder, and the `sluice`
//! process running it.

use std::{
    fs,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use super::*;

/// The consumer settings of every test pipeline: tansu's session timeout, and metadata
/// refreshed often enough to see new partitions.
pub const SOURCE_PROPERTIES: &str = r#"[source.properties]
"session.timeout.ms" = "6000"
"heartbeat.interval.ms" = "500"
"topic.metadata.refresh.interval.ms" = "1000""#;

/// A pipeline for a test: its file, topics, group and output folder.
pub struct TestPipeline {
    pub dir: tempfile::TempDir,
    pub file: PathBuf,
    pub topic: String,
    pub dlq: String,
    pub group: String,
    pub output: PathBuf,
}

impl TestPipeline {
    /// Creates the topics and writes a pipeline file; `parquet_extra` adds sink keys.
    pub fn new(broker: &Broker, partitions: i32, parquet_extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let topic = unique("events");
        let dlq = format!("{topic}.dlq");
        let group = unique("group");
        broker.create_topic(&topic, partitions);
        broker.create_topic(&dlq, 1);
        let output = dir.path().join("out");
        fs::write(dir.path().join("schema.json"), SCHEMA).unwrap();
        let file = dir.path().join("pipeline.toml");
        fs::write(
            &file,
            format!(
                r#"
name = "test"
schema = "schema.json"
[source]
bootstrap_servers = "{bootstrap}"
topics = ["{topic}"]
group_id = "{group}"
{SOURCE_PROPERTIES}
[batch]
max_rows = 500
max_delay = "100ms"
[errors]
dead_letter_topic = "{dlq}"
max_event_size = "4KiB"
max_depth = 16
[sink.parquet]
path = "out"
partition_by = ["dt", "hour"]
time_field = "at"
{parquet_extra}
"#,
                bootstrap = broker.bootstrap
            ),
        )
        .unwrap();
        Self {
            dir,
            file,
            topic,
            dlq,
            group,
            output,
        }
    }

    /// Replaces `from` (which must be there) with `to` in the pipeline file.
    pub fn edit(&self, from: &str, to: &str) {
        let text = fs::read_to_string(&self.file).unwrap();
        assert!(text.contains(from), "{from:?} is not in the pipeline file");
        fs::write(&self.file, text.replace(from, to)).unwrap();
    }

    /// Starts `sluice run` on this pipeline; its log goes to `log`.
    pub fn spawn(&self, log: &str) -> KillOnDrop {
        self.spawn_listening(log, "off")
    }

    /// Starts `sluice run` with its HTTP listener on `listen`, and waits until it listens.
    pub fn spawn_listening(&self, log: &str, listen: &str) -> KillOnDrop {
        self.spawn_with(log, listen, &[])
    }

    /// Starts one `sluice run` process on this pipeline and `others`; its log goes to `log`
    /// (in this pipeline's folder).
    pub fn spawn_together(&self, others: &[&TestPipeline], log: &str) -> KillOnDrop {
        self.spawn_files(others, log, "off", &[])
    }

    /// [`Self::spawn_listening`] with more environment variables.
    pub fn spawn_with(&self, log: &str, listen: &str, env: &[(&str, &str)]) -> KillOnDrop {
        self.spawn_files(&[], log, listen, env)
    }

    fn spawn_files(
        &self,
        others: &[&TestPipeline],
        log: &str,
        listen: &str,
        env: &[(&str, &str)],
    ) -> KillOnDrop {
        let name = log;
        let log = fs::File::create(self.dir.path().join(log)).unwrap();
        let child = KillOnDrop(
            Command::new(env!("CARGO_BIN_EXE_sluice"))
                .arg("run")
                .arg(&self.file)
                .args(others.iter().map(|p| &p.file))
                .args(["--listen", listen, "--grace-period", "20s"])
                .env("RUST_LOG", "info,sluice=debug")
                // Plain `key=value` fields in the log, for the tests that look for them.
                .env("NO_COLOR", "1")
                .envs(env.iter().copied())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
        if let Some(addr) = listen.strip_prefix("127.0.0.1:") {
            // The binary maps libtorch at start, which takes a moment on a busy machine.
            let port: u16 = addr.parse().unwrap();
            let started = Instant::now();
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                assert!(
                    started.elapsed() < Duration::from_secs(60),
                    "sluice never listened on {port}:\n{}",
                    self.log(name)
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        child
    }

    /// SIGTERM, then a clean exit within 30 s, or fails with the log `log`.
    pub fn stop(&self, sluice: &mut KillOnDrop, log: &str) {
        sigterm(&sluice.0);
        let status = wait_exit(&mut sluice.0, Duration::from_secs(30));
        assert!(status.success(), "exit {status:?}\n{}", self.log(log));
    }

    /// Runs `sluice` on this pipeline until it has committed everything, then stops it
    /// cleanly; its log goes to `log`.
    pub fn run_until_drained(&self, broker: &Broker, timeout: Duration, log: &str) {
        let mut sluice = self.spawn(log);
        self.wait_drained(broker, timeout);
        self.stop(&mut sluice, log);
    }

    /// Waits until the pipeline has committed everything; on timeout, fails with its logs.
    pub fn wait_drained(&self, broker: &Broker, timeout: Duration) {
        if let Err(e) = broker.wait_committed(&self.topic, &self.group, timeout) {
            let mut logs = String::new();
            for entry in fs::read_dir(self.dir.path()).unwrap().flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.ends_with(".log") {
                    let text = self.log(&name);
                    let tail: Vec<&str> = text.lines().rev().take(40).collect();
                    logs += &format!("\n==== {name} (last lines) ====\n");
                    for line in tail.into_iter().rev() {
                        logs += line;
                        logs.push('\n');
                    }
                }
            }
            panic!("{e}{logs}");
        }
    }

    /// Waits until the log `log` contains `needle`; fails with the log after 60 s.
    pub fn wait_for_log(&self, log: &str, needle: &str) {
        assert!(
            self.log_within(log, needle, Duration::from_secs(60)),
            "no {needle:?} in the log:\n{}",
            self.log(log)
        );
    }

    /// Whether the log `log` contains `needle` within `timeout`.
    pub fn log_within(&self, log: &str, needle: &str, timeout: Duration) -> bool {
        let started = std::time::Instant::now();
        while !self.log(log).contains(needle) {
            if started.elapsed() > timeout {
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        true
    }

    pub fn log(&self, name: &str) -> String {
        fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }
}
