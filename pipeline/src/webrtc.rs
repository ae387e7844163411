//! The plain-WebRTC transport: the signalling server of gst-plugin-webrtc-signalling run
//! in-process, a watch on the producers it announces, and the Rust WebRTC elements of
//! gst-plugin-webrtc (`webrtcsrc`, `webrtcsink`, `livekitwebrtcsrc`, `livekitwebrtcsink`),
//! registered statically so that graphs and `vox run` can use them.
//!
//! How a call meets the agent: the caller publishes its microphone (`webrtcsink`, meta
//! `vox-role=caller, call=ID`); the agent, watching producers, starts a session that consumes
//! it (`webrtcsrc`) and publishes its voice (`webrtcsink`, meta `vox-role=agent, call=ID`),
//! which the caller, watching too, consumes. Each direction is one WebRTC connection.

use gst::glib;
use gst::prelude::*;
use gstrswebrtc::signaller::{Signallable, SignallableExt, Signaller, WebRTCSignallerRole};
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::thread::JoinHandle;

#[derive(Debug, thiserror::Error)]
pub enum WebrtcError {
    #[error("cannot listen for signalling on {addr}: {why}")]
    Listen { addr: String, why: String },
    #[error("cannot start the signalling server: {0}")]
    Runtime(String),
    #[error("cannot register the WebRTC elements: {0}")]
    Register(String),
}

/// Registers gst-plugin-webrtc's elements in this process (once).
pub fn register() -> Result<(), WebrtcError> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| gstrswebrtc::plugin_register_static().map_err(|e| e.to_string()))
        .clone()
        .map_err(WebrtcError::Register)
}

/// The signalling server, serving WebSocket connections on its own thread until dropped.
pub struct Signalling {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Signalling {
    /// Listens on `listen` (`HOST:PORT`; port 0 picks a free one).
    pub fn start(listen: &str) -> Result<Self, WebrtcError> {
        let fail = |why: String| WebrtcError::Listen {
            addr: listen.to_string(),
            why,
        };
        let listener = std::net::TcpListener::bind(listen).map_err(|e| fail(e.to_string()))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| fail(e.to_string()))?;
        let addr = listener.local_addr().map_err(|e| fail(e.to_string()))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("vox-signalling")
            .enable_all()
            .build()
            .map_err(|e| WebrtcError::Runtime(e.to_string()))?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("vox-signalling".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::error!("signalling server: {e}");
                            return;
                        }
                    };
                    let server = gst_plugin_webrtc_signalling::server::Server::spawn(
                        gst_plugin_webrtc_signalling::handlers::Handler::new,
                    );
                    let accept = async {
                        loop {
                            match listener.accept().await {
                                Ok((stream, peer)) => {
                                    tracing::debug!("signalling: connection from {peer}");
                                    let mut server = server.clone();
                                    tokio::spawn(async move {
                                        if let Err(e) = server.accept_async(stream).await {
                                            tracing::debug!("signalling: {peer}: {e}");
                                        }
                                    });
                                }
                                Err(e) => tracing::warn!("signalling: accept failed: {e}"),
                            }
                        }
                    };
                    tokio::select! {
                        _ = accept => {}
                        _ = stopped => {}
                    }
                });
            })
            .map_err(|e| WebrtcError::Runtime(e.to_string()))?;
        Ok(Self {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The URL clients connect to (`ws://ADDR`).
    pub fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }
}

impl Drop for Signalling {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A producer announced on the signalling server.
#[derive(Debug, Clone)]
pub struct Producer {
    pub id: String,
    pub meta: Option<gst::Structure>,
}

impl Producer {
    /// A string field of the producer's meta.
    pub fn meta_str(&self, field: &str) -> Option<String> {
        self.meta.as_ref().and_then(|m| m.get::<String>(field).ok())
    }
}

/// What a [`Producers`] watch reports.
#[derive(Debug, Clone)]
pub enum ProducerEvent {
    Added(Producer),
    Removed(String),
    /// The signalling server welcomed the watch (it is connected).
    Connected,
    /// The connection to the signalling server failed or broke. (A server that closes it
    /// cleanly, with a WebSocket close, is not reported by gst-plugin-webrtc 0.15.4's
    /// signaller.)
    Error(String),
}

/// Watches the producers on a signalling server (a listener peer), reporting each as it comes
/// and goes; those present when the watch starts are reported too. Stops when dropped.
pub struct Producers {
    signaller: Signaller,
}

impl Producers {
    pub fn watch(
        uri: &str,
        on_event: impl Fn(ProducerEvent) + Send + Sync + 'static,
    ) -> Result<Self, WebrtcError> {
        register()?;
        let signaller = Signaller::new(WebRTCSignallerRole::Listener);
        signaller.set_property("uri", uri);
        let on_event = std::sync::Arc::new(on_event);
        let added = on_event.clone();
        signaller.connect("producer-added", false, move |args| {
            let id = args[1].get::<String>().unwrap_or_default();
            let meta = args[2].get::<Option<gst::Structure>>().ok().flatten();
            added(ProducerEvent::Added(Producer { id, meta }));
            None
        });
        let removed = on_event.clone();
        signaller.connect("producer-removed", false, move |args| {
            removed(ProducerEvent::Removed(
                args[1].get::<String>().unwrap_or_default(),
            ));
            None
        });
        let connected = on_event.clone();
        signaller.connect_notify(Some("client-id"), move |s, _| {
            if s.property::<Option<String>>("client-id")
                .is_some_and(|id| !id.is_empty())
            {
                connected(ProducerEvent::Connected);
            }
        });
        let error = on_event;
        signaller.connect("error", false, move |args| {
            error(ProducerEvent::Error(
                args[1].get::<String>().unwrap_or_default(),
            ));
            None
        });
        signaller.upcast_ref::<Signallable>().start();
        Ok(Self { signaller })
    }
}

impl Drop for Producers {
    fn drop(&mut self) {
        self.signaller.upcast_ref::<Signallable>().stop();
    }
}

/// A [`Producers`] watch that outlives its signalling server: when the connection fails or
/// breaks (reported as [`ProducerEvent::Error`]), it connects again, after 0.5 s and then
/// doubling up to 10 s while the server stays away. `on_connected` is told each time the
/// server welcomes it (the producers present are reported again then, as on any new watch).
/// Stops when dropped.
pub struct Watch {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Watch {
    pub fn start(
        uri: &str,
        on_event: impl Fn(ProducerEvent) + Send + Sync + 'static,
        on_connected: impl Fn() + Send + 'static,
    ) -> Result<Self, WebrtcError> {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{Arc, mpsc};
        use std::time::Duration;
        register()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let on_event = Arc::new(on_event);
        let uri = uri.to_string();
        let thread = std::thread::Builder::new()
            .name("vox-watch".into())
            .spawn(move || {
                // Sleeps up to `d`; false when told to stop meanwhile.
                let pause = |d: Duration| {
                    let until = std::time::Instant::now() + d;
                    while std::time::Instant::now() < until {
                        if stopping.load(Ordering::SeqCst) {
                            return false;
                        }
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    !stopping.load(Ordering::SeqCst)
                };
                let mut backoff = Duration::from_millis(500);
                while !stopping.load(Ordering::SeqCst) {
                    // true: welcomed; false: failed.
                    let (tell, told) = mpsc::channel::<bool>();
                    let events = on_event.clone();
                    let watch = Producers::watch(&uri, move |event| {
                        match event {
                            ProducerEvent::Error(_) => drop(tell.send(false)),
                            ProducerEvent::Connected => drop(tell.send(true)),
                            _ => {}
                        }
                        events(event)
                    });
                    if let Ok(watch) = watch {
                        loop {
                            if stopping.load(Ordering::SeqCst) {
                                drop(watch);
                                return;
                            }
                            match told.recv_timeout(Duration::from_millis(100)) {
                                Ok(true) => {
                                    backoff = Duration::from_millis(500);
                                    on_connected();
                                }
                                Ok(false) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
                                Err(mpsc::RecvTimeoutError::Timeout) => {}
                            }
                        }
                        // The failed signaller stops on a thread of its own: gst-plugin-webrtc's
                        // stop can hang (see `stop_within`), and must not hold the next try.
                        let _ = std::thread::Builder::new()
                            .name("vox-watch-stop".into())
                            .spawn(move || drop(watch));
                    }
                    if !pause(backoff) {
                        return;
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            })
            .map_err(|e| WebrtcError::Runtime(e.to_string()))?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Clears the public STUN server webrtcsrc/webrtcsink default to: a self-hosted agent and its
/// callers meet on the local network, and looking the server up where there is no route to it
/// only slows the connection. Applied to every WebRTC element in `bin`.
pub fn no_public_stun(bin: &gst::Bin) {
    for element in bin.iterate_recurse().into_iter().flatten() {
        let Some(factory) = element.factory() else {
            continue;
        };
        if matches!(factory.name().as_str(), "webrtcsrc" | "webrtcsink")
            && element
                .property::<Option<String>>("stun-server")
                .is_some_and(|s| s.is_empty() || s.contains("stun.l.google.com"))
        {
            element.set_property("stun-server", None::<String>);
        }
    }
}

/// Stops a pipeline with WebRTC sources in it, as [`runner::stop_within`] does, and then the
/// sessions those sources were ending on their own at that moment.
///
/// `webrtcsrc` (and `livekitwebrtcsrc`, built on it) keeps each session in a bin of its own.
/// When the peer leaves, it stops that bin on a thread of its own and then takes it out of
/// itself. A pipeline stopped in that instant sets the bin back to PAUSED on its way down, after
/// `webrtcsrc` stopped it and before `webrtcsrc` takes it out; the bin is then out of the
/// pipeline and left running: its webrtcbin's ICE and streaming threads (four) and buffers live
/// on for good, one set per call that ended so (gst-plugin-webrtc 0.15.4; it happens when the
/// agent ends a session because the caller left). Holding those bins from before the stop, and
/// stopping them after it, ends them either way; a bin that stopped cleanly is left as it is.
pub fn stop_within(pipeline: &gst::Pipeline, limit: std::time::Duration) -> bool {
    let sessions = source_sessions(pipeline.upcast_ref());
    if !crate::runner::stop_within(pipeline, limit) {
        return false;
    }
    // On a thread of its own, within the same limit: a stop that hangs is left behind.
    let (tx, rx) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("webrtc-stop".into())
        .spawn(move || {
            for session in sessions {
                if session.current_state() != gst::State::Null {
                    let _ = session.set_state(gst::State::Null);
                }
            }
            let _ = tx.send(());
        });
    spawned.is_ok() && rx.recv_timeout(limit).is_ok()
}

/// The session bins inside every WebRTC source (a subclass of gst-plugin-webrtc's
/// `GstBaseWebRTCSrc`) in `bin`.
fn source_sessions(bin: &gst::Bin) -> Vec<gst::Element> {
    let Some(base) = glib::Type::from_name("GstBaseWebRTCSrc") else {
        return Vec::new();
    };
    bin.iterate_recurse()
        .into_iter()
        .flatten()
        .filter(|e| e.type_().is_a(base))
        .filter_map(|e| e.downcast::<gst::Bin>().ok())
        .flat_map(|src| src.children())
        .filter(|child| child.is::<gst::Bin>())
        .collect()
}

/// The jitter buffer of received WebRTC audio, in ms: webrtcbin's default is 200 ms, meant for
/// the open internet; the agent and its callers are usually a LAN apart, and every millisecond
/// here is added to the time the agent takes to hear the end of a question.
pub const JITTER_MS: u32 = 20;

/// Opus frames sent, in ms: opusenc's default is 20 ms, and the encoder holds a whole frame
/// back before it sends it, in both directions of a turn and of a barge-in.
pub const OPUS_FRAME_MS: &str = "10";

/// Sets [`JITTER_MS`] on every webrtcbin in `bin` and [`OPUS_FRAME_MS`] on the Opus encoders of
/// every WebRTC sink in it (which builds them in pipelines of its own, per consumer), for the
/// elements there now and those added later.
pub fn low_latency(bin: &gst::Bin) {
    for element in bin.iterate_recurse().into_iter().flatten() {
        tune(&element);
    }
    bin.connect_deep_element_added(|_, _, element| tune(element));
}

fn tune(element: &gst::Element) {
    match element.factory().map(|f| f.name()).as_deref() {
        Some("webrtcbin") => element.set_property("latency", JITTER_MS),
        Some("webrtcsink" | "livekitwebrtcsink") => {
            element.connect("encoder-setup", false, |args| {
                if let Some(encoder) = args.get(3).and_then(|a| a.get::<gst::Element>().ok())
                    && encoder.factory().is_some_and(|f| f.name() == "opusenc")
                {
                    encoder.set_property_from_str("frame-size", OPUS_FRAME_MS);
                }
                // webrtcsink's own defaults still apply.
                Some(false.to_value())
            });
        }
        _ => {}
    }
}
