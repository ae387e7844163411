//! A network namespace for WebRTC tests: libnice ignores loopback, so the agent and its callers
//! meet on a veth pair (198.18.0.1 and .2) inside a namespace of their own (platform.md). It
//! needs root (or CAP_NET_ADMIN), `unshare`/`nsenter` (util-linux) and `ip` (iproute2, installed
//! by scripts/setup).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const AGENT_IP: &str = "198.18.0.1";

pub struct Netns {
    holder: Child,
}

impl Netns {
    pub fn new() -> Self {
        let setup = "ip link set lo up && ip link add v0 type veth peer name v1 && \
                     ip addr add 198.18.0.1/24 dev v0 && ip addr add 198.18.0.2/24 dev v1 && \
                     ip link set v0 up && ip link set v1 up && echo ready && exec sleep 100000";
        let mut holder = Command::new("unshare")
            .args(["-n", "sh", "-c", setup])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("unshare (util-linux) is missing");
        let mut line = String::new();
        BufReader::new(holder.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        if line.trim() != "ready" {
            let _ = holder.kill();
            let mut err = String::new();
            let _ = std::io::Read::read_to_string(&mut holder.stderr.take().unwrap(), &mut err);
            panic!(
                "cannot make a network namespace with a veth pair (needs root or CAP_NET_ADMIN, \
                 and iproute2 from scripts/setup): {err}"
            );
        }
        Self { holder }
    }

    /// `program` run inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/proc/{}/ns/net", self.holder.id()))
            .arg("--")
            .arg(program);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

/// A running `vox agent`; its stderr is collected, and it is stopped (SIGKILL) when dropped.
pub struct Agent {
    pub child: Child,
    /// Where its HTTP endpoints are (signalling port + 1000).
    pub http_port: u16,
    lines: mpsc::Receiver<String>,
    pub log: Vec<String>,
    pub url: String,
}

impl Agent {
    /// Starts `vox agent` in `ns` on `port` with extra arguments, and waits until it is ready.
    pub fn start(ns: &Netns, port: u16, args: &[&str]) -> Self {
        let mut cmd = ns.command(env!("CARGO_BIN_EXE_vox"));
        super::isolate(&mut cmd);
        cmd.args([
            "agent",
            "--transport",
            "webrtc",
            "--signalling-listen",
            &format!("{AGENT_IP}:{port}"),
            "--http",
            &format!("{AGENT_IP}:{}", port + 1000),
        ])
        .args(args)
        .env("VOX_LOG", "info,gst_plugin_webrtc_signalling=warn");
        Self::spawn(cmd, format!("ws://{AGENT_IP}:{port}"), port + 1000)
    }

    /// Runs `cmd` (a `vox agent` command line) and waits until it is ready.
    pub fn spawn(mut cmd: Command, url: String, http_port: u16) -> Self {
        cmd.stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("cannot start vox agent");
        let (tx, lines) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut agent = Self {
            child,
            lines,
            log: Vec::new(),
            url,
            http_port,
        };
        agent
            .wait_for("vox agent: ready", Duration::from_secs(60))
            .unwrap_or_else(|| panic!("vox agent did not get ready:\n{}", agent.log.join("\n")));
        agent
    }

    /// Waits for a stderr line containing `needle`; returns it.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let hit = line.contains(needle);
                    self.log.push(line.clone());
                    if hit {
                        return Some(line);
                    }
                }
                Err(_) => return None,
            }
        }
        None
    }

    /// Everything logged so far.
    pub fn drain_log(&mut self) -> String {
        while let Ok(line) = self.lines.try_recv() {
            self.log.push(line);
        }
        self.log.join("\n")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// GET `url` with `curl` (a command to run it, in a namespace or not): (status, body).
pub fn curl_get(mut curl: Command, url: &str) -> (u16, String) {
    let out = curl
        .args(["-s", "-w", "\n%{http_code}", url])
        .output()
        .expect("curl is installed by scripts/setup");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// The value of metric `name` (a full series name, labels included) in a `/metrics` body.
pub fn metric_in(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l[name.len()..].trim().parse().ok())
}

/// A port free on 127.0.0.1 just now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free local port")
}

impl Netns {
    /// GET `path` from the agent's HTTP endpoints inside the namespace: (status, body).
    pub fn http_get(&self, port: u16, path: &str) -> (u16, String) {
        curl_get(
            self.command("curl"),
            &format!("http://{AGENT_IP}:{port}{path}"),
        )
    }

    /// The value of metric `name` (a full series name, labels included) in `/metrics`.
    pub fn metric(&self, port: u16, name: &str) -> Option<f64> {
        metric_in(&self.http_get(port, "/metrics").1, name)
    }

    /// Waits up to `timeout` for metric `name` to satisfy `ok`.
    pub fn wait_metric(
        &self,
        port: u16,
        name: &str,
        timeout: Duration,
        ok: impl Fn(f64) -> bool,
    ) -> Option<f64> {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.metric(port, name);
            if v.is_some_and(&ok) || Instant::now() > deadline {
                return v;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Resident memory of a process, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// The names of a process's threads.
pub fn thread_names(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .map(|name| name.trim().to_string())
        .collect()
}
