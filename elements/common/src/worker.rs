//! The worker thread behind a model-backed element: the streaming thread queues jobs and
//! serialized events, the worker runs the jobs and pushes results and events downstream in the
//! same order. A flush bumps the generation: queued work from before it is dropped, a job in
//! flight sees the change and stops, and `push_lock` keeps a push from straddling FlushStop.

use crossbeam_channel::{Receiver, Sender};
use gst::prelude::*;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

/// Inference runs that pay off at once on this machine when each uses `threads` threads: one
/// per `threads` cores. More would only share the same cores and finish later all together.
pub fn runs_at_once(threads: u32) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores / threads.max(1) as usize).max(1)
}

/// What the worker receives, tagged with the generation it was queued in.
pub enum Work<J> {
    Job(J, u64),
    Event(gst::Event, u64),
    Stop,
}

/// The queue into a running worker, and its thread.
type Running<J> = (Sender<Work<J>>, JoinHandle<()>);

pub struct Serial<J> {
    worker: Mutex<Option<Running<J>>>,
    generation: AtomicU64,
    /// Held by the worker from its generation check to the end of a push, and by FlushStop.
    pub push_lock: Mutex<()>,
}

impl<J: Send + 'static> Default for Serial<J> {
    fn default() -> Self {
        Self {
            worker: Mutex::new(None),
            generation: AtomicU64::new(0),
            push_lock: Mutex::new(()),
        }
    }
}

impl<J: Send + 'static> Serial<J> {
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// FlushStart (or stop): work queued so far is dropped, the job in flight is cancelled.
    pub fn bump(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// Starts the worker thread `name` running `run` over the queue.
    pub fn start(
        &self,
        name: &str,
        run: impl FnOnce(Receiver<Work<J>>) + Send + 'static,
    ) -> std::io::Result<()> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let handle = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || run(rx))?;
        *self.worker.lock().unwrap_or_else(|p| p.into_inner()) = Some((tx, handle));
        Ok(())
    }

    /// Stops the worker (cancelling what it does) and waits for it.
    pub fn stop(&self) {
        let worker = self.worker.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some((tx, handle)) = worker {
            self.bump();
            let _ = tx.send(Work::Stop);
            let _ = handle.join();
        }
    }

    /// Queues a job in the current generation; false when no worker runs.
    pub fn queue(&self, job: J) -> bool {
        self.send(Work::Job(job, self.generation()))
    }

    /// Sends a serialized event downstream in order with the results: through the worker, or
    /// straight on `srcpad` when no worker runs.
    pub fn forward(&self, srcpad: &gst::Pad, event: gst::Event) -> bool {
        if self.send(Work::Event(event.clone(), self.generation())) {
            true
        } else {
            srcpad.push_event(event)
        }
    }

    /// The worker's side of [`forward`](Self::forward): sticky events (stream-start, caps,
    /// tags) still hold after a flush; a segment or other event from before it does not.
    pub fn push_event(&self, srcpad: &gst::Pad, event: gst::Event, generation: u64) {
        let _push = self.push_lock.lock().unwrap_or_else(|p| p.into_inner());
        let keep = event.is_sticky() && event.type_() != gst::EventType::Segment;
        if generation == self.generation() || keep {
            srcpad.push_event(event);
        }
    }

    fn send(&self, work: Work<J>) -> bool {
        let worker = self.worker.lock().unwrap_or_else(|p| p.into_inner());
        worker.as_ref().is_some_and(|(tx, _)| tx.send(work).is_ok())
    }
}
