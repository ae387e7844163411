//! The vox pipeline library: graph files, running pipelines, transcription of files, transcript
//! formats, and model fetching/conversion. The `vox` command line is a thin shell over this.

pub mod agent;
pub mod call;
pub mod ct2;
pub mod fetch;
pub mod graph;
pub mod livekit;
pub mod metrics;
pub mod reply;
pub mod runner;
pub mod serve;
pub mod speak;
pub mod transcribe;
pub mod transcript;
pub mod webrtc;

pub use vox_common::models;
