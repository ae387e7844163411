//! `vox agent --transport livekit`: the LiveKit agent worker protocol, and LiveKit end to end.
//!
//! No LiveKit server can run here (it is in no package registry: see platform.md), so the
//! worker-protocol test plays the server's agent service itself, built from
//! `livekit-protocol`'s own types over a real WebSocket: it checks the worker's token, takes its
//! registration, offers jobs, watches the availability answers and load reports, terminates a
//! job, gives a job whose room cannot be reached, drops the connection, and sends SIGTERM. The
//! agent is the real binary with its real models and session graph (`agent-livekit`).
//!
//! The end-to-end test needs a real server (`livekit-server --dev`) and is ignored unless run
//! with `--ignored` and `LIVEKIT_URL`, `LIVEKIT_API_KEY`, `LIVEKIT_API_SECRET` set.

mod common;

use common::netns::{Agent, curl_get, free_port, metric_in};
use common::*;
use livekit_api::access_token::{AccessToken, TokenVerifier, VideoGrants};
use livekit_protocol_07 as proto;
use prost_012::Message as _;
use proto::server_message::Message as S;
use proto::worker_message::Message as W;
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};
use tungstenite::{Message, WebSocket};

const KEY: &str = "vox-test-key";
const SECRET: &str = "vox-test-secret-that-is-long-enough";

/// The server side of one worker connection.
struct Service {
    ws: WebSocket<TcpStream>,
    /// Every load report seen, in order.
    statuses: Vec<proto::UpdateWorkerStatus>,
}

impl Service {
    /// Accepts the worker's connection on `listener`: the path must be `/agent` and the bearer
    /// token valid for our key with the `agent` grant.
    // tungstenite's handshake callback returns its (large) error response by value.
    #[allow(clippy::result_large_err)]
    fn accept(listener: &TcpListener) -> Self {
        listener.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let stream = loop {
            match listener.accept() {
                Ok((stream, _)) => break stream,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(Instant::now() < deadline, "the worker did not connect");
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        stream.set_nonblocking(false).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut path = String::new();
        let mut auth = String::new();
        let ws = tungstenite::accept_hdr(
            stream,
            |req: &tungstenite::handshake::server::Request,
             resp: tungstenite::handshake::server::Response| {
                path = req.uri().path().to_string();
                auth = req
                    .headers()
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                Ok(resp)
            },
        )
        .expect("a WebSocket handshake from the worker");
        assert_eq!(path, "/agent");
        let token = auth
            .strip_prefix("Bearer ")
            .expect("a bearer token in Authorization");
        let claims = TokenVerifier::with_api_key(KEY, SECRET)
            .verify(token)
            .expect("the worker's token is signed with our key");
        assert!(
            claims.video.agent,
            "the worker's token lacks the agent grant"
        );
        Self {
            ws,
            statuses: Vec::new(),
        }
    }

    fn send(&mut self, m: S) {
        let bytes = proto::ServerMessage { message: Some(m) }.encode_to_vec();
        self.ws.send(Message::Binary(bytes.into())).unwrap();
    }

    /// The next message from the worker (None: the connection ended), within `timeout`.
    fn next(&mut self, timeout: Duration) -> Option<W> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            match self.ws.read() {
                Ok(Message::Binary(b)) => {
                    let m = proto::WorkerMessage::decode(b.as_ref())
                        .expect("the worker sends WorkerMessage protobufs")
                        .message
                        .expect("a message");
                    if let W::UpdateWorker(s) = &m {
                        self.statuses.push(s.clone());
                    }
                    return Some(m);
                }
                Ok(Message::Close(_)) => return None,
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return None,
            }
        }
        panic!("the worker sent nothing for {timeout:?}");
    }

    /// Reads until `pick` takes a message (others are kept in `statuses` or skipped).
    fn expect<T>(&mut self, what: &str, mut pick: impl FnMut(&W) -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut seen = Vec::new();
        while Instant::now() < deadline {
            let m = self
                .next(deadline - Instant::now())
                .unwrap_or_else(|| panic!("connection ended waiting for {what}; saw {seen:#?}"));
            if let Some(t) = pick(&m) {
                return t;
            }
            seen.push(m);
        }
        panic!("no {what} from the worker; saw {seen:#?}")
    }

    fn status(&mut self, what: &str, ok: impl Fn(&proto::UpdateWorkerStatus) -> bool) {
        self.expect(what, |m| match m {
            W::UpdateWorker(s) if ok(s) => Some(()),
            _ => None,
        })
    }

    fn offer(&mut self, job: &str, room: &str) -> proto::AvailabilityResponse {
        self.send(S::Availability(proto::AvailabilityRequest {
            job: Some(job_of(job, room)),
            resuming: false,
        }));
        self.expect("an availability answer", |m| match m {
            W::Availability(a) if a.job_id == job => Some(a.clone()),
            _ => None,
        })
    }

    fn assign(&mut self, job: &str, room: &str, identity: &str, url: &str) {
        let token = AccessToken::with_api_key(KEY, SECRET)
            .with_identity(identity)
            .with_grants(VideoGrants {
                room_join: true,
                room: room.into(),
                ..Default::default()
            })
            .to_jwt()
            .unwrap();
        self.send(S::Assignment(proto::JobAssignment {
            job: Some(job_of(job, room)),
            url: Some(url.into()),
            token,
        }));
    }

    fn job_status(&mut self, job: &str) -> proto::UpdateJobStatus {
        self.expect(&format!("a status of job {job}"), |m| match m {
            W::UpdateJob(u) if u.job_id == job => Some(u.clone()),
            _ => None,
        })
    }
}

fn job_of(id: &str, room: &str) -> proto::Job {
    proto::Job {
        id: id.into(),
        r#type: proto::JobType::JtRoom as i32,
        room: Some(proto::Room {
            name: room.into(),
            sid: format!("RM_{room}"),
            ..Default::default()
        }),
        ..Default::default()
    }
}

const AVAILABLE: i32 = proto::WorkerStatus::WsAvailable as i32;
const FULL: i32 = proto::WorkerStatus::WsFull as i32;

fn http_get(port: u16, path: &str) -> (u16, String) {
    curl_get(tool("curl"), &format!("http://127.0.0.1:{port}{path}"))
}

fn metric(port: u16, name: &str) -> Option<f64> {
    metric_in(&http_get(port, "/metrics").1, name)
}

#[test]
fn worker_protocol_registers_takes_jobs_reports_load_and_drains() {
    let service = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("ws://{}", service.local_addr().unwrap());
    // A "room" whose server accepts connections and never answers: a job there stays active
    // (joining) for the signal client's 5 s timeout.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_url = format!("ws://{}", silent.local_addr().unwrap());
    let http_port = free_port();
    let mut cmd = vox();
    cmd.args(["agent", "--transport", "livekit", "--livekit-url", &url])
        .args(["--agent-name", "vox-test", "--max-sessions", "1"])
        .args(["--http", &format!("127.0.0.1:{http_port}")])
        .env("LIVEKIT_API_KEY", KEY)
        .env("LIVEKIT_API_SECRET", SECRET)
        .env("VOX_LOG", "info");
    let mut agent = Agent::spawn(cmd, url.clone(), http_port);
    let mut lk = Service::accept(&service);

    // Registration: a room worker with our agent name.
    let register = lk.expect("a registration", |m| match m {
        W::Register(r) => Some(r.clone()),
        _ => None,
    });
    assert_eq!(register.r#type, proto::JobType::JtRoom as i32);
    assert_eq!(register.agent_name, "vox-test");
    assert!(!register.version.is_empty());
    // The agent's participant may publish, subscribe and set its own metadata (agent state).
    let allowed = register.allowed_permissions.expect("permissions asked");
    assert!(allowed.can_publish && allowed.can_subscribe && allowed.can_update_metadata);
    // Not ready until the server confirms the registration.
    assert_eq!(http_get(http_port, "/readyz").0, 503);
    lk.send(S::Register(proto::RegisterWorkerResponse {
        worker_id: "AW_test".into(),
        server_info: None,
    }));
    lk.status("an idle load report", |s| {
        s.status == Some(AVAILABLE) && s.job_count == 0 && s.load == 0.0
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while http_get(http_port, "/readyz").0 != 200 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(http_get(http_port, "/readyz").0, 200);

    // A job: accepted, assigned, running; the worker is then full and says so.
    let yes = lk.offer("AJ_1", "kitchen");
    assert!(yes.available, "{yes:?}");
    assert_eq!(yes.participant_identity, "agent-AJ_1");
    lk.assign("AJ_1", "kitchen", "agent-AJ_1", &silent_url);
    let running = lk.job_status("AJ_1");
    assert_eq!(
        running.status,
        proto::JobStatus::JsRunning as i32,
        "{running:?}"
    );
    lk.status("a full load report", |s| {
        s.status == Some(FULL) && s.job_count == 1 && s.load == 1.0
    });
    assert_eq!(metric(http_port, "vox_sessions_active"), Some(1.0));
    // Full: the next job is declined.
    let no = lk.offer("AJ_2", "hall");
    assert!(!no.available, "{no:?}");
    // The server ends the job: it succeeds, and the worker has room again.
    lk.send(S::Termination(proto::JobTermination {
        job_id: "AJ_1".into(),
    }));
    let ended = lk.job_status("AJ_1");
    assert_eq!(
        ended.status,
        proto::JobStatus::JsSuccess as i32,
        "{ended:?}\n{}",
        agent.drain_log()
    );
    lk.status("an idle load report", |s| {
        s.status == Some(AVAILABLE) && s.job_count == 0
    });

    // A job whose room cannot be reached fails with a reason; the worker goes on.
    assert!(lk.offer("AJ_3", "attic").available);
    lk.assign("AJ_3", "attic", "agent-AJ_3", "ws://127.0.0.1:1");
    let mut status = lk.job_status("AJ_3");
    if status.status == proto::JobStatus::JsRunning as i32 {
        status = lk.job_status("AJ_3");
    }
    assert_eq!(
        status.status,
        proto::JobStatus::JsFailed as i32,
        "{status:?}"
    );
    assert!(
        status.error.contains("Connection refused") && !status.error.contains("backtrace"),
        "{status:?}"
    );
    lk.status("an idle load report", |s| {
        s.status == Some(AVAILABLE) && s.job_count == 0
    });
    assert!(metric(http_port, "vox_sessions_failed_total").unwrap_or(0.0) >= 1.0);

    // A job for a room that is not given at all is refused, not crashed on.
    lk.send(S::Assignment(proto::JobAssignment {
        job: Some(proto::Job {
            id: "AJ_4".into(),
            ..Default::default()
        }),
        url: None,
        token: "not a token".into(),
    }));
    let bad = lk.job_status("AJ_4");
    assert_eq!(bad.status, proto::JobStatus::JsFailed as i32, "{bad:?}");

    // The server goes away: the worker reconnects and registers again.
    drop(lk);
    let mut lk = Service::accept(&service);
    lk.expect("a second registration", |m| match m {
        W::Register(r) if r.agent_name == "vox-test" => Some(()),
        _ => None,
    });
    lk.send(S::Register(proto::RegisterWorkerResponse {
        worker_id: "AW_test".into(),
        server_info: None,
    }));
    lk.status("an idle load report", |s| s.status == Some(AVAILABLE));

    // SIGTERM: the worker reports itself full (draining), declines jobs, and exits 0.
    check(tool("kill").args(["-TERM", &agent.child.id().to_string()]));
    lk.status("a draining (full) report", |s| s.status == Some(FULL));
    let exit = agent.child.wait().unwrap();
    assert!(exit.success(), "{exit:?}\n{}", agent.drain_log());
    let log = agent.drain_log();
    assert!(!log.contains(SECRET), "the secret was logged");
}

#[test]
fn livekit_agent_without_credentials_or_server_says_what_is_missing() {
    let out = run(vox()
        .args([
            "agent",
            "--transport",
            "livekit",
            "--livekit-url",
            "ws://127.0.0.1:1",
        ])
        .env_remove("LIVEKIT_API_KEY")
        .env_remove("LIVEKIT_API_SECRET"));
    assert_one_line_error(&out, "LIVEKIT_API_KEY");
    let out = run(vox()
        .args(["agent", "--transport", "livekit"])
        .env_remove("LIVEKIT_URL")
        .env("LIVEKIT_API_KEY", KEY)
        .env("LIVEKIT_API_SECRET", SECRET));
    assert_one_line_error(&out, "LIVEKIT_URL");
    let out = run(vox()
        .args([
            "agent",
            "--transport",
            "livekit",
            "--livekit-url",
            "lk:7880",
        ])
        .env("LIVEKIT_API_KEY", KEY)
        .env("LIVEKIT_API_SECRET", SECRET)
        .args(["--http", ""]));
    assert_one_line_error(&out, "not a LiveKit URL");
}

#[test]
fn token_is_signed_for_the_room_and_identity_and_reads_secrets_from_files() {
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("secret");
    std::fs::write(&secret_file, format!("{SECRET}\n")).unwrap();
    let token = check(
        vox()
            .args(["token", "--room", "kitchen", "--identity", "ann"])
            .env("LIVEKIT_API_KEY", KEY)
            .env_remove("LIVEKIT_API_SECRET")
            .env("LIVEKIT_API_SECRET_FILE", &secret_file),
    );
    let claims = TokenVerifier::with_api_key(KEY, SECRET)
        .verify(token.trim())
        .expect("a token signed with the secret from the file");
    assert_eq!(claims.sub, "ann");
    assert_eq!(claims.video.room, "kitchen");
    assert!(claims.video.room_join);
    let out = run(vox()
        .args(["token", "--room", "kitchen", "--identity", "ann"])
        .env_remove("LIVEKIT_API_KEY")
        .env_remove("LIVEKIT_API_SECRET")
        .env_remove("LIVEKIT_API_SECRET_FILE"));
    assert_one_line_error(&out, "LIVEKIT_API_KEY");
}

/// Against a real LiveKit server: `livekit-server --dev` gives LIVEKIT_URL=ws://127.0.0.1:7880,
/// LIVEKIT_API_KEY=devkey, LIVEKIT_API_SECRET=secret. Run with
/// `cargo test --release --test livekit -- --ignored`.
#[test]
#[ignore = "needs a LiveKit server: set LIVEKIT_URL, LIVEKIT_API_KEY, LIVEKIT_API_SECRET and run with --ignored"]
fn livekit_end_to_end_answers_a_call() {
    let (Ok(url), Ok(_), Ok(_)) = (
        std::env::var("LIVEKIT_URL"),
        std::env::var("LIVEKIT_API_KEY"),
        std::env::var("LIVEKIT_API_SECRET"),
    ) else {
        panic!(
            "set LIVEKIT_URL, LIVEKIT_API_KEY and LIVEKIT_API_SECRET (livekit-server --dev: \
             ws://127.0.0.1:7880, devkey, secret)"
        );
    };
    let dir = tempfile::tempdir().unwrap();
    let q = dir.path().join("q.wav");
    check(
        vox()
            .args(["speak", "What is the capital of France?", "-o"])
            .arg(&q),
    );
    let http_port = free_port();
    let mut cmd = vox();
    cmd.args(["agent", "--transport", "livekit", "--livekit-url", &url])
        .args(["--http", &format!("127.0.0.1:{http_port}")])
        .env("VOX_LOG", "info");
    let mut agent = Agent::spawn(cmd, url.clone(), http_port);
    let room = format!("vox-e2e-{}", std::process::id());
    let token = check(vox().args(["token", "--room", &room, "--identity", "caller"]));
    let record = dir.path().join("call.wav");
    check(
        vox()
            .args(["call", "--livekit", &url, "--token", token.trim(), "--play"])
            .arg(&q)
            .arg("--record")
            .arg(&record)
            .args(["--timeout-s", "90"]),
    );
    let agent_side = dir.path().join("agent.wav");
    check(
        tool("sox")
            .arg(&record)
            .arg(&agent_side)
            .args(["remix", "2"]),
    );
    let heard = normalize(&check(vox().arg("transcribe").arg(&agent_side)));
    assert!(
        heard.contains("paris"),
        "the agent said: {heard}\n{}",
        agent.drain_log()
    );
}
