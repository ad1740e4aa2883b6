//! A local S3-compatible server (moto) for one test, and `integration-tests/s3.py`, which
//! talks to it with boto3 and pyarrow.

use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use super::*;

pub struct Moto {
    pub endpoint: String,
    _process: KillOnDrop,
}

impl Moto {
    pub fn start() -> Self {
        let port = free_port();
        let process = KillOnDrop(
            Command::new("python3")
                .args([
                    "-m",
                    "moto.server",
                    "-H",
                    "127.0.0.1",
                    "-p",
                    &port.to_string(),
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("python3 -m moto.server (the test command installs moto)"),
        );
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "moto did not start"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Self {
            endpoint: format!("http://127.0.0.1:{port}"),
            _process: process,
        }
    }

    /// `s3.py ENDPOINT ARGS…`, which must succeed; what it printed, trimmed.
    pub fn run(&self, args: &[&str]) -> String {
        let helper = Path::new(env!("CARGO_MANIFEST_DIR")).join("integration-tests/s3.py");
        run_ok(
            Command::new("python3")
                .arg(helper)
                .arg(&self.endpoint)
                .args(args),
            &format!("s3.py {args:?}"),
        )
        .trim()
        .to_owned()
    }

    /// The `object_store` options that reach this server, as TOML `key = "value"` lines.
    pub fn options(&self) -> Vec<(&'static str, String)> {
        vec![
            ("aws_endpoint", self.endpoint.clone()),
            ("aws_allow_http", "true".into()),
            ("aws_region", "us-east-1".into()),
            ("aws_access_key_id", "test".into()),
            ("aws_secret_access_key", "test".into()),
        ]
    }

    /// [`Self::options`] as a TOML inline table.
    pub fn inline_options(&self) -> String {
        let pairs: Vec<String> = self
            .options()
            .iter()
            .map(|(k, v)| format!("{k} = \"{v}\""))
            .collect();
        format!("{{ {} }}", pairs.join(", "))
    }
}
