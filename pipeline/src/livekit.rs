//! The LiveKit transport: access tokens, and the agent worker protocol by which a LiveKit server
//! hands jobs (a room to join) to `vox agent`, as it does to LiveKit's own agent workers.
//!
//! The worker keeps one WebSocket to `{LIVEKIT_URL}/agent` (bearer token with the `agent`
//! grant) and speaks protobuf (`livekit-protocol`'s `WorkerMessage` / `ServerMessage`):
//! register, answer availability requests (yes while it has room, no when full or draining),
//! take job assignments (the room's URL and a token for the agent's participant), report each
//! job's status and the worker's load (`WS_FULL` when full or draining, so the server stops
//! sending work), and end jobs the server terminates. It reconnects with back-off when the
//! server goes away; the jobs running go on.
//!
//! Secrets come from the environment (`LIVEKIT_API_KEY`, `LIVEKIT_API_SECRET`) or files named by
//! `LIVEKIT_API_KEY_FILE` / `LIVEKIT_API_SECRET_FILE` (Kubernetes secrets), never from flags, and
//! are never logged.

use livekit_api::access_token::{AccessToken, Claims, VideoGrants};
use livekit_protocol_07 as proto;
use prost_012::Message as _;
use std::collections::HashMap;
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

#[derive(Debug, thiserror::Error)]
pub enum LivekitError {
    #[error(
        "no LiveKit API key: set LIVEKIT_API_KEY (or LIVEKIT_API_KEY_FILE) and LIVEKIT_API_SECRET (or LIVEKIT_API_SECRET_FILE)"
    )]
    NoCredentials,
    #[error("cannot read {var} from {path}: {why}")]
    SecretFile {
        var: &'static str,
        path: String,
        why: String,
    },
    #[error("cannot make a LiveKit token: {0}")]
    Token(String),
    #[error("not a LiveKit URL: {0:?} (expected ws://, wss://, http:// or https://)")]
    Url(String),
    #[error("cannot start the LiveKit worker: {0}")]
    Thread(String),
}

/// A LiveKit API key and its secret (the secret never printed).
#[derive(Clone)]
pub struct Credentials {
    pub key: String,
    secret: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    pub fn new(key: &str, secret: &str) -> Self {
        Self {
            key: key.to_string(),
            secret: secret.to_string(),
        }
    }

    /// From `LIVEKIT_API_KEY` / `LIVEKIT_API_SECRET`, or the files `..._FILE` name.
    pub fn from_env() -> Result<Self, LivekitError> {
        let read = |var: &'static str| -> Result<Option<String>, LivekitError> {
            if let Ok(v) = std::env::var(var)
                && !v.trim().is_empty()
            {
                return Ok(Some(v.trim().to_string()));
            }
            let file_var = format!("{var}_FILE");
            match std::env::var(&file_var) {
                Ok(path) if !path.is_empty() => std::fs::read_to_string(&path)
                    .map(|s| Some(s.trim().to_string()).filter(|s| !s.is_empty()))
                    .map_err(|e| LivekitError::SecretFile {
                        var,
                        path,
                        why: e.to_string(),
                    }),
                _ => Ok(None),
            }
        };
        match (read("LIVEKIT_API_KEY")?, read("LIVEKIT_API_SECRET")?) {
            (Some(key), Some(secret)) => Ok(Self { key, secret }),
            _ => Err(LivekitError::NoCredentials),
        }
    }

    /// A token to join `room` as `identity`, in `role`.
    pub fn room_token(
        &self,
        room: &str,
        identity: &str,
        name: &str,
        role: Role,
        ttl: Duration,
    ) -> Result<String, LivekitError> {
        let listener = role != Role::Participant;
        let agent = role == Role::AgentListener;
        let grants = VideoGrants {
            room_join: true,
            room: room.to_string(),
            can_publish: Some(!listener),
            can_publish_data: Some(!listener),
            can_subscribe: Some(true),
            hidden: listener,
            agent,
            ..Default::default()
        };
        let token = AccessToken::with_api_key(&self.key, &self.secret)
            .with_identity(identity)
            .with_name(name)
            .with_ttl(ttl)
            .with_grants(grants);
        let token = if agent {
            token.with_kind("agent")
        } else {
            token
        };
        token
            .to_jwt()
            .map_err(|e| LivekitError::Token(e.to_string()))
    }

    /// The worker's token for the agent service.
    fn agent_token(&self) -> Result<String, LivekitError> {
        AccessToken::with_api_key(&self.key, &self.secret)
            .with_ttl(Duration::from_secs(3600))
            .with_grants(VideoGrants {
                agent: true,
                ..Default::default()
            })
            .to_jwt()
            .map_err(|e| LivekitError::Token(e.to_string()))
    }
}

/// Who a room token is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Publishes and subscribes (a user, `vox call`'s microphone).
    Participant,
    /// Hidden from the others, may only subscribe (`vox call`'s ears).
    Listener,
    /// A listener that is part of an agent (the agent's ears, apart from its voice): like the
    /// agent's own participant, it neither keeps an empty room open nor counts as a user.
    AgentListener,
}

/// The identity and room a token was made for (read without verifying it: the server does).
pub fn token_subject(token: &str) -> Result<(String, String), LivekitError> {
    let claims = Claims::from_unverified(token).map_err(|e| LivekitError::Token(e.to_string()))?;
    Ok((claims.sub, claims.video.room))
}

/// `ws(s)://HOST[:PORT]/PATH` for a LiveKit URL given as ws, wss, http or https.
pub fn ws_url(url: &str, path: &str) -> Result<String, LivekitError> {
    let url = url.trim().trim_end_matches('/');
    let rest = [
        ("ws://", "ws://"),
        ("http://", "ws://"),
        ("wss://", "wss://"),
        ("https://", "wss://"),
    ]
    .iter()
    .find_map(|(from, to)| url.strip_prefix(from).map(|rest| format!("{to}{rest}")))
    .filter(|u| !u.ends_with("//"))
    .ok_or_else(|| LivekitError::Url(url.to_string()))?;
    Ok(format!("{rest}{path}"))
}

/// A job the server assigned: a room to join and the token for the agent's participant.
#[derive(Debug, Clone)]
pub struct Assignment {
    pub job_id: String,
    pub room: String,
    /// The LiveKit URL to join (the server's own, or the worker's).
    pub url: String,
    /// The agent participant's token (publishes the voice).
    pub token: String,
    /// The agent participant's identity.
    pub identity: String,
    /// The participant the job is about (participant jobs), or none (room jobs: anyone).
    pub participant: Option<String>,
}

/// What a job came to.
#[derive(Debug, Clone)]
pub enum JobOutcome {
    Running,
    Done,
    Failed(String),
}

/// What the worker asks of the agent.
pub trait Jobs: Send + Sync + 'static {
    /// Active jobs, the most this worker takes, and whether it takes any (not draining).
    fn load(&self) -> (usize, usize, bool);
    /// Starts a job; an error fails the job (reported to the server).
    fn assign(&self, job: Assignment) -> Result<(), String>;
    /// The server ended a job.
    fn terminate(&self, job_id: &str);
}

/// Messages to the worker's connection from elsewhere in the process.
enum Out {
    Job(String, JobOutcome),
    Status,
}

/// Sends a job's status and the load to the server (through the worker's connection).
#[derive(Clone)]
pub struct Reporter(Sender<Out>);

impl Reporter {
    pub fn job(&self, job_id: &str, outcome: JobOutcome) {
        let _ = self.0.send(Out::Job(job_id.to_string(), outcome));
        let _ = self.0.send(Out::Status);
    }

    /// The load changed (a job ended, draining began).
    pub fn status(&self) {
        let _ = self.0.send(Out::Status);
    }
}

/// The reporter, made before the worker so that the jobs it starts can report.
pub fn reporter() -> (Reporter, Outbox) {
    let (tx, rx) = std::sync::mpsc::channel();
    (Reporter(tx), Outbox(rx))
}

pub struct Outbox(Receiver<Out>);

#[derive(Debug, Clone)]
pub struct WorkerOptions {
    pub url: String,
    /// Explicit dispatch name (empty: the server dispatches every room to this worker pool).
    pub agent_name: String,
    /// How often the load is reported.
    pub status_interval: Duration,
}

/// The worker connection, on its own thread until dropped.
pub struct Worker {
    stop: Arc<AtomicBool>,
    reporter: Reporter,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Worker {
    /// Connects (and keeps reconnecting) to the server's agent service. `fault` holds why the
    /// worker is not registered, or none while it is.
    pub fn start(
        options: WorkerOptions,
        credentials: Credentials,
        jobs: Arc<dyn Jobs>,
        (reporter, outbox): (Reporter, Outbox),
        fault: Arc<Mutex<Option<String>>>,
    ) -> Result<Self, LivekitError> {
        let url = ws_url(&options.url, "/agent")?;
        credentials.agent_token()?;
        let _ = rustls::crypto::ring::default_provider().install_default();
        set_fault(
            &fault,
            Some("not registered with the LiveKit server yet".into()),
        );
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("vox-livekit-worker".into())
                .spawn(move || {
                    let mut backoff = Duration::from_millis(500);
                    let mut conn = Connection {
                        options,
                        jobs,
                        outbox,
                        reserved: HashMap::new(),
                        stop,
                    };
                    while !conn.stop.load(Ordering::SeqCst) {
                        let registered = Instant::now();
                        let why = match credentials.agent_token() {
                            Ok(token) => conn.run(&url, &token, &fault),
                            Err(e) => e.to_string(),
                        };
                        if conn.stop.load(Ordering::SeqCst) {
                            break;
                        }
                        tracing::warn!("LiveKit worker: {why}; reconnecting in {backoff:?}");
                        set_fault(&fault, Some(why));
                        if registered.elapsed() > Duration::from_secs(30) {
                            backoff = Duration::from_millis(500);
                        }
                        let until = Instant::now() + backoff;
                        while Instant::now() < until && !conn.stop.load(Ordering::SeqCst) {
                            std::thread::sleep(Duration::from_millis(50));
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(15));
                    }
                })
                .map_err(|e| LivekitError::Thread(e.to_string()))?
        };
        Ok(Self {
            stop,
            reporter,
            thread: Some(thread),
        })
    }

    pub fn reporter(&self) -> Reporter {
        self.reporter.clone()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn set_fault(fault: &Mutex<Option<String>>, why: Option<String>) {
    *fault.lock().unwrap_or_else(|p| p.into_inner()) = why;
}

type Socket = WebSocket<MaybeTlsStream<TcpStream>>;

/// How long an accepted availability holds a place for the assignment.
const RESERVATION: Duration = Duration::from_secs(10);
/// The load LiveKit servers aim their workers at (`agents.target_load`, 0.7 by default): a
/// server only offers jobs to workers that report less. An available worker reports its share
/// of this; a full (or draining) one reports 1.
const TARGET_LOAD: f32 = 0.7;
/// The server pings every 10 s: this long without a frame, the connection is dead.
const SILENCE: Duration = Duration::from_secs(30);

struct Connection {
    options: WorkerOptions,
    jobs: Arc<dyn Jobs>,
    outbox: Outbox,
    /// Jobs this worker said yes to, awaiting their assignment.
    reserved: HashMap<String, Instant>,
    stop: Arc<AtomicBool>,
}

impl Connection {
    /// One connection, until it fails or the worker stops; returns why it ended.
    fn run(&mut self, url: &str, token: &str, fault: &Mutex<Option<String>>) -> String {
        let mut socket = match connect(url, token) {
            Ok(s) => s,
            Err(e) => return e,
        };
        let register = proto::worker_message::Message::Register(proto::RegisterWorkerRequest {
            r#type: proto::JobType::JtRoom as i32,
            agent_name: self.options.agent_name.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            // What the server grants the agent's participant (as LiveKit's own workers ask).
            allowed_permissions: Some(proto::ParticipantPermission {
                can_subscribe: true,
                can_publish: true,
                can_publish_data: true,
                can_update_metadata: true,
                ..Default::default()
            }),
            ..Default::default()
        });
        if let Err(e) = send(&mut socket, register) {
            return e;
        }
        let mut registered = false;
        let mut last_status = Instant::now();
        let mut last_sent = None;
        let asked = Instant::now();
        let mut heard = Instant::now();
        loop {
            if self.stop.load(Ordering::SeqCst) {
                // Draining was reported before; the server sees the worker go.
                let _ = self.send_status(&mut socket, &mut last_sent, true);
                let _ = socket.close(None);
                let _ = socket.flush();
                return "stopped".into();
            }
            if !registered && asked.elapsed() > Duration::from_secs(10) {
                return "the LiveKit server did not confirm the registration".into();
            }
            if heard.elapsed() > SILENCE {
                return format!("nothing from the LiveKit server for {SILENCE:?}");
            }
            while let Ok(out) = self.outbox.0.try_recv() {
                let sent = match out {
                    Out::Job(id, outcome) => send(&mut socket, job_update(&id, &outcome)),
                    Out::Status => self.send_status(&mut socket, &mut last_sent, false),
                };
                if let Err(e) = sent {
                    return e;
                }
            }
            if registered && last_status.elapsed() >= self.options.status_interval {
                last_status = Instant::now();
                if let Err(e) = self.send_status(&mut socket, &mut last_sent, true) {
                    return e;
                }
            }
            let message = socket.read();
            if message.is_ok() {
                heard = Instant::now();
            }
            let message = match message {
                Ok(Message::Binary(bytes)) => bytes,
                Ok(Message::Close(frame)) => {
                    return format!(
                        "the LiveKit server closed the connection{}",
                        frame.map(|f| format!(": {}", f.reason)).unwrap_or_default()
                    );
                }
                Ok(_) => continue,
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    continue;
                }
                Err(e) => return format!("connection to the LiveKit server lost: {e}"),
            };
            let message = match proto::ServerMessage::decode(message.as_ref()) {
                Ok(m) => m.message,
                Err(e) => {
                    tracing::warn!("LiveKit worker: undecodable server message ignored: {e}");
                    continue;
                }
            };
            use proto::server_message::Message as S;
            let reply = match message {
                Some(S::Register(r)) => {
                    registered = true;
                    set_fault(fault, None);
                    tracing::info!(
                        "registered with the LiveKit server as worker {} (agent name {:?})",
                        r.worker_id,
                        self.options.agent_name
                    );
                    self.send_status(&mut socket, &mut last_sent, true)
                }
                Some(S::Availability(request)) => {
                    let answer = self.availability(request);
                    send(&mut socket, answer)
                        .and_then(|()| self.send_status(&mut socket, &mut last_sent, false))
                }
                Some(S::Assignment(a)) => {
                    let update = self.assign(a);
                    send(&mut socket, update)
                        .and_then(|()| self.send_status(&mut socket, &mut last_sent, false))
                }
                Some(S::Termination(t)) => {
                    tracing::info!("job {}: ended by the LiveKit server", t.job_id);
                    self.jobs.terminate(&t.job_id);
                    Ok(())
                }
                Some(S::Pong(_)) | None => Ok(()),
            };
            if let Err(e) = reply {
                return e;
            }
        }
    }

    /// The agent's load with the places held for jobs accepted but not yet assigned:
    /// (active, active + held, max, accepting).
    fn committed(&mut self) -> (usize, usize, usize, bool) {
        self.reserved.retain(|_, at| at.elapsed() < RESERVATION);
        let (active, max, accepting) = self.jobs.load();
        (active, active + self.reserved.len(), max, accepting)
    }

    fn availability(
        &mut self,
        request: proto::AvailabilityRequest,
    ) -> proto::worker_message::Message {
        let job = request.job.unwrap_or_default();
        let (_, committed, max, accepting) = self.committed();
        let available = accepting && committed < max;
        let room = job.room.as_ref().map(|r| r.name.as_str()).unwrap_or("");
        if available {
            self.reserved.insert(job.id.clone(), Instant::now());
            tracing::info!("job {} (room {room:?}): accepted", job.id);
        } else {
            tracing::info!(
                "job {} (room {room:?}): declined, {}",
                job.id,
                if accepting { "full" } else { "draining" }
            );
        }
        proto::worker_message::Message::Availability(proto::AvailabilityResponse {
            job_id: job.id.clone(),
            available,
            participant_identity: format!("agent-{}", job.id),
            participant_name: "vox agent".into(),
            ..Default::default()
        })
    }

    fn assign(&mut self, a: proto::JobAssignment) -> proto::worker_message::Message {
        let job = a.job.unwrap_or_default();
        self.reserved.remove(&job.id);
        let outcome = (|| {
            let room = job
                .room
                .as_ref()
                .map(|r| r.name.clone())
                .filter(|r| !r.is_empty())
                .ok_or("the job names no room")?;
            let identity = token_subject(&a.token)
                .map(|(identity, _)| identity)
                .map_err(|e| e.to_string())?;
            let assignment = Assignment {
                job_id: job.id.clone(),
                room,
                url: a
                    .url
                    .clone()
                    .filter(|u| !u.is_empty())
                    .unwrap_or_else(|| self.options.url.clone()),
                token: a.token.clone(),
                identity,
                participant: job
                    .participant
                    .as_ref()
                    .map(|p| p.identity.clone())
                    .filter(|p| !p.is_empty()),
            };
            let (active, max, accepting) = self.jobs.load();
            if !accepting || active >= max {
                return Err(format!(
                    "worker {}",
                    if accepting { "full" } else { "draining" }
                ));
            }
            self.jobs.assign(assignment).map_err(|e| e.to_string())
        })();
        let outcome = match outcome {
            Ok(()) => JobOutcome::Running,
            Err(e) => {
                tracing::error!("job {}: {e}", job.id);
                JobOutcome::Failed(e.to_string())
            }
        };
        job_update(&job.id, &outcome)
    }

    /// Reports the load when it changed (or `always`).
    fn send_status(
        &mut self,
        socket: &mut Socket,
        last: &mut Option<(i32, u32)>,
        always: bool,
    ) -> Result<(), String> {
        let (active, committed, max, accepting) = self.committed();
        let full = !accepting || committed >= max;
        let status = if full {
            proto::WorkerStatus::WsFull
        } else {
            proto::WorkerStatus::WsAvailable
        } as i32;
        let now = (status, active as u32);
        if !always && *last == Some(now) {
            return Ok(());
        }
        *last = Some(now);
        send(
            socket,
            proto::worker_message::Message::UpdateWorker(proto::UpdateWorkerStatus {
                status: Some(status),
                load: if full {
                    1.0
                } else {
                    TARGET_LOAD * committed as f32 / max as f32
                },
                job_count: active as u32,
            }),
        )
    }
}

fn job_update(job_id: &str, outcome: &JobOutcome) -> proto::worker_message::Message {
    let (status, error) = match outcome {
        JobOutcome::Running => (proto::JobStatus::JsRunning, String::new()),
        JobOutcome::Done => (proto::JobStatus::JsSuccess, String::new()),
        JobOutcome::Failed(e) => (proto::JobStatus::JsFailed, e.clone()),
    };
    proto::worker_message::Message::UpdateJob(proto::UpdateJobStatus {
        job_id: job_id.to_string(),
        status: status as i32,
        error,
    })
}

fn send(socket: &mut Socket, message: proto::worker_message::Message) -> Result<(), String> {
    let bytes = proto::WorkerMessage {
        message: Some(message),
    }
    .encode_to_vec();
    socket
        .send(Message::Binary(bytes.into()))
        .map_err(|e| format!("cannot send to the LiveKit server: {e}"))
}

/// Opens the WebSocket (TCP connect with a timeout, TLS for wss), reads with a short timeout
/// so that the loop can send between reads.
fn connect(url: &str, token: &str) -> Result<Socket, String> {
    use tungstenite::client::IntoClientRequest;
    let mut request = url
        .into_client_request()
        .map_err(|e| format!("bad LiveKit URL {url}: {e}"))?;
    let uri = request.uri().clone();
    let host = uri.host().unwrap_or_default().to_string();
    let port = uri
        .port_u16()
        .unwrap_or(if uri.scheme_str() == Some("wss") {
            443
        } else {
            80
        });
    request.headers_mut().insert(
        "Authorization",
        format!("Bearer {token}")
            .parse()
            .map_err(|_| "the token is not a valid header value".to_string())?,
    );
    let addr = (host.as_str(), port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {host}: {e}"))?
        .next()
        .ok_or_else(|| format!("cannot resolve {host}"))?;
    let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("cannot reach the LiveKit server at {host}:{port}: {e}"))?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let _ = tcp.set_nodelay(true);
    let (socket, _) = tungstenite::client_tls_with_config(request, tcp, None, None)
        .map_err(|e| format!("the LiveKit agent service at {url} refused the worker: {e}"))?;
    let tcp = match socket.get_ref() {
        MaybeTlsStream::Plain(s) => s,
        MaybeTlsStream::Rustls(s) => s.get_ref(),
        _ => return Err("unsupported TLS stream".into()),
    };
    tcp.set_read_timeout(Some(Duration::from_millis(50)))
        .map_err(|e| e.to_string())?;
    Ok(socket)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn livekit_urls_become_websocket_urls() {
        assert_eq!(
            ws_url("http://lk:7880/", "/agent").unwrap(),
            "ws://lk:7880/agent"
        );
        assert_eq!(
            ws_url("wss://x.livekit.cloud", "/agent").unwrap(),
            "wss://x.livekit.cloud/agent"
        );
        assert_eq!(ws_url("https://x", "/rtc").unwrap(), "wss://x/rtc");
        assert!(ws_url("lk:7880", "/agent").is_err());
        assert!(ws_url("ws://", "/agent").is_err());
    }

    #[test]
    fn tokens_carry_identity_room_and_grants() {
        let c = Credentials::new("devkey", "secret-secret-secret-secret-secret");
        let t = c
            .room_token(
                "kitchen",
                "ann",
                "Ann",
                Role::AgentListener,
                Duration::from_secs(60),
            )
            .unwrap();
        assert_eq!(
            token_subject(&t).unwrap(),
            ("ann".to_string(), "kitchen".to_string())
        );
        let claims = livekit_api::access_token::TokenVerifier::with_api_key(
            "devkey",
            "secret-secret-secret-secret-secret",
        )
        .verify(&t)
        .unwrap();
        assert!(
            claims.video.hidden
                && claims.video.can_publish == Some(false)
                && claims.video.room_join
        );
        assert!(claims.video.agent && claims.kind == "agent");
        let agent = livekit_api::access_token::TokenVerifier::with_api_key(
            "devkey",
            "secret-secret-secret-secret-secret",
        )
        .verify(&c.agent_token().unwrap())
        .unwrap();
        assert!(agent.video.agent);
        assert!(!format!("{c:?}").contains("secret-secret"));
    }
}
