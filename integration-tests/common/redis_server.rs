//! A real `redis-server` for one test.

use std::{
    collections::BTreeMap,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use super::*;

/// A real `redis-server` on a free loopback port, with an append-only file so that a restart
/// keeps the data (`REDIS_SERVER` names the binary, default `redis-server`).
pub struct RedisServer {
    pub port: u16,
    dir: tempfile::TempDir,
    extra: Vec<String>,
    process: Option<Child>,
}

impl RedisServer {
    pub fn start(extra: &[&str]) -> Self {
        Self::start_on(free_port(), extra)
    }

    pub fn start_on(port: u16, extra: &[&str]) -> Self {
        let mut server = Self {
            port,
            dir: tempfile::tempdir().unwrap(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            process: None,
        };
        server.restart();
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again, on the same port and data).
    pub fn restart(&mut self) {
        let bin = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let process = Command::new(&bin)
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {bin} ({e}); the test command installs redis-server")
            });
        self.process = Some(process);
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the server (SIGKILL: no goodbye to clients).
    pub fn kill(&mut self) {
        if let Some(mut p) = self.process.take() {
            let _ = p.kill();
            let _ = p.wait();
        }
    }

    /// Runs one command with a plain client; its reply as text.
    pub fn command(&self, args: &[&str]) -> String {
        let client = redis::Client::open(self.url()).unwrap();
        let mut con = client.get_connection().unwrap();
        redis::cmd(args[0]).arg(&args[1..]).query(&mut con).unwrap()
    }

    /// Every hash whose key starts with `prefix`, read with a plain client (keys of other
    /// types are left out).
    pub fn hashes(&self, prefix: &str) -> BTreeMap<String, BTreeMap<String, String>> {
        let client = redis::Client::open(self.url()).unwrap();
        let mut con = client.get_connection().unwrap();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}*"))
            .query(&mut con)
            .unwrap();
        let mut out = BTreeMap::new();
        for k in keys {
            let kind: String = redis::cmd("TYPE").arg(&k).query(&mut con).unwrap();
            if kind == "hash" {
                let h: BTreeMap<String, String> =
                    redis::cmd("HGETALL").arg(&k).query(&mut con).unwrap();
                out.insert(k, h);
            }
        }
        out
    }

    /// `CLUSTER INFO` of this node.
    pub fn cluster_info(&self) -> String {
        let client = redis::Client::open(self.url()).unwrap();
        let mut con = client.get_connection().unwrap();
        redis::cmd("CLUSTER").arg("INFO").query(&mut con).unwrap()
    }

    pub fn ttl(&self, key: &str) -> i64 {
        let client = redis::Client::open(self.url()).unwrap();
        let mut con = client.get_connection().unwrap();
        redis::cmd("TTL").arg(key).query(&mut con).unwrap()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Redis Cluster of three real masters on free ports, formed with `redis-cli --cluster
/// create`, up on every node before this returns.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts the cluster; a node that lost its port to another test between the choice of
    /// ports and its start (it exits) makes this try again on new ports, up to three times.
    pub fn start() -> Self {
        let mut failures = Vec::new();
        for _ in 0..3 {
            match Self::try_start() {
                Ok(cluster) => return cluster,
                Err(e) => failures.push(e),
            }
        }
        panic!(
            "no Redis Cluster after three tries:\n{}",
            failures.join("\n")
        );
    }

    fn try_start() -> Result<Self, String> {
        // Node ports and cluster-bus ports, all distinct (the bus defaults to port + 10000,
        // which may not exist for a high free port).
        let ports = free_ports(6);
        let nodes: Vec<RedisServer> = (0..3)
            .map(|i| {
                let bus = ports[i + 3].to_string();
                let args = [
                    "--cluster-enabled",
                    "yes",
                    "--cluster-node-timeout",
                    "2000",
                    "--cluster-port",
                    &bus,
                ];
                RedisServer::start_on(ports[i], &args)
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .map_err(|e| format!("redis-cli could not start: {e}"))?;
        let created = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            return Err(format!(
                "redis-cli --cluster create: {}{created}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let started = Instant::now();
        while !nodes
            .iter()
            .all(|n| n.cluster_info().contains("cluster_state:ok"))
        {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "cluster did not form: {created}\n{}",
                nodes[0].cluster_info()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(Self { nodes })
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// Every hash whose key starts with `prefix`, over all nodes.
    pub fn hashes(&self, prefix: &str) -> BTreeMap<String, BTreeMap<String, String>> {
        let mut out = BTreeMap::new();
        for n in &self.nodes {
            out.extend(n.hashes(prefix));
        }
        out
    }
}
