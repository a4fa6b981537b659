//! Hub and agent processes for field tests, each in its own data directory.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::Context;

use crate::client::ApiClient;

/// How long a process may take to print its ready line.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A temporary directory for one test, removed on drop unless `CAIRN_KEEP_TEST_DIRS` is set.
#[derive(Debug)]
pub struct TestDir {
    path: PathBuf,
}

impl TestDir {
    /// A fresh directory named after the test.
    pub fn new(name: &str) -> anyhow::Result<Self> {
        let unique = format!("cairn-{name}-{}-{}", std::process::id(), rand_suffix());
        let path = std::env::temp_dir().join(unique);
        std::fs::create_dir_all(&path)?;
        Ok(Self { path })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::env::var_os("CAIRN_KEEP_TEST_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// A UDP port on 127.0.0.1 that was free a moment ago (for a hub that must restart on the same port).
pub fn free_udp_port() -> anyhow::Result<u16> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The path of a workspace binary built for the same profile as the running executable.
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent().context("executable has no directory")?.to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    anyhow::ensure!(
        path.exists(),
        "{} not found: run `cargo build --workspace --bins` first",
        path.display()
    );
    Ok(path)
}

/// A running child process whose ready line was read; killed on drop.
#[derive(Debug)]
struct Running {
    child: Child,
    ready_line: String,
}

fn spawn(name: &str, args: &[String], log: &Path) -> anyhow::Result<Running> {
    let stderr = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
    let mut child = Command::new(binary(name)?)
        .args(args)
        .env("RUST_LOG", std::env::var("CAIRN_TEST_LOG").unwrap_or_else(|_| "info".into()))
        // No job runner unless a test asks for it (`--jobs-enabled true`): its profile
        // document would add to the documents and feed positions the sync tests count.
        .env("CAIRN_JOBS_ENABLED", "false")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    let stdout = child.stdout.take().context("no stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        if let Some(Ok(line)) = lines.next() {
            let _ = tx.send(line);
        }
        // Keep draining so the child never blocks on a full pipe.
        for _ in lines {}
    });
    match rx.recv_timeout(START_TIMEOUT) {
        Ok(ready_line) => Ok(Running { child, ready_line }),
        Err(_) => {
            let _ = child.kill();
            let log_text = std::fs::read_to_string(log).unwrap_or_default();
            anyhow::bail!("{name} did not become ready; its log:\n{log_text}")
        }
    }
}

impl Running {
    fn field(&self, key: &str) -> anyhow::Result<String> {
        self.ready_line
            .split_whitespace()
            .find_map(|part| part.strip_prefix(&format!("{key}=")))
            .map(str::to_owned)
            .with_context(|| format!("no {key}= in {:?}", self.ready_line))
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn sigkill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn sigterm(&mut self, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status()?;
        let started = std::time::Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if started.elapsed() > timeout {
                self.sigkill();
                anyhow::bail!("process did not exit within {timeout:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.sigkill();
    }
}

/// A `cloud-hub` process.
#[derive(Debug)]
pub struct Hub {
    running: Running,
    /// The QUIC address agents dial.
    pub quic: SocketAddr,
    /// Client for the hub's HTTP endpoints.
    pub http: ApiClient,
}

impl Hub {
    /// Starts a hub with its data under `root/<name>`, the shared CA under `root/ca`.
    pub fn start(root: &Path, name: &str, quic_port: u16) -> anyhow::Result<Self> {
        Self::start_with(root, name, quic_port, &[])
    }

    /// Like [`Hub::start`], with extra command-line arguments.
    pub fn start_with(
        root: &Path,
        name: &str,
        quic_port: u16,
        extra: &[String],
    ) -> anyhow::Result<Self> {
        let mut args = vec![
            "--data-dir".into(),
            root.join(name).display().to_string(),
            "--ca-dir".into(),
            root.join("ca").display().to_string(),
            "--listen".into(),
            format!("127.0.0.1:{quic_port}"),
            "--http-listen".into(),
            "127.0.0.1:0".into(),
        ];
        args.extend_from_slice(extra);
        let running = spawn("cloud-hub", &args, &root.join(format!("{name}.log")))?;
        let quic = running.field("quic")?.parse()?;
        let http = ApiClient::new(running.field("http")?);
        Ok(Self { running, quic, http })
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.running.pid()
    }

    /// Kills the process with SIGKILL (a crash).
    pub fn kill(mut self) {
        self.running.sigkill();
    }

    /// Stops the process with SIGTERM and waits for it to exit.
    pub fn terminate(mut self) -> anyhow::Result<std::process::ExitStatus> {
        self.running.sigterm(Duration::from_secs(20))
    }
}

/// An `edge-agent` process.
#[derive(Debug)]
pub struct Agent {
    running: Running,
    /// Client for the agent's local API.
    pub api: ApiClient,
}

impl Agent {
    /// Starts an agent with its data under `root/<name>`, dialing `hub`.
    pub fn start(root: &Path, name: &str, hub: SocketAddr) -> anyhow::Result<Self> {
        Self::start_with(root, name, hub, &[])
    }

    /// Like [`Agent::start`], with extra command-line arguments.
    pub fn start_with(
        root: &Path,
        name: &str,
        hub: SocketAddr,
        extra: &[String],
    ) -> anyhow::Result<Self> {
        let mut args = vec![
            "--data-dir".into(),
            root.join(name).display().to_string(),
            "--ca-dir".into(),
            root.join("ca").display().to_string(),
            "--hub".into(),
            hub.to_string(),
            "--api-listen".into(),
            "127.0.0.1:0".into(),
        ];
        args.extend_from_slice(extra);
        let running = spawn("edge-agent", &args, &root.join(format!("{name}.log")))?;
        let api = ApiClient::new(running.field("api")?);
        Ok(Self { running, api })
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.running.pid()
    }

    /// Kills the process with SIGKILL (a crash).
    pub fn kill(mut self) {
        self.running.sigkill();
    }

    /// Stops the process with SIGTERM and waits for it to exit.
    pub fn terminate(mut self) -> anyhow::Result<std::process::ExitStatus> {
        self.running.sigterm(Duration::from_secs(20))
    }
}
