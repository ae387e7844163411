use gst::glib;
use gst::prelude::*;

mod imp;

/// Where the model runs (the `backend` property).
#[derive(Debug, Eq, PartialEq, Ord, PartialOrd, Hash, Clone, Copy, Default, glib::Enum)]
#[repr(u32)]
#[enum_type(name = "GstWhisperSttBackend")]
pub enum Backend {
    /// A transcription service when `url` is set, else in-process.
    #[default]
    #[enum_value(
        name = "the transcription service at url when it is set, else in-process",
        nick = "auto"
    )]
    Auto = 0,
    /// In-process.
    #[enum_value(name = "in-process", nick = "local")]
    Local = 1,
    /// The transcription service at `url`.
    #[enum_value(name = "the transcription service at url", nick = "remote")]
    Remote = 2,
}

impl From<Backend> for vox_common::remote::Backend {
    fn from(b: Backend) -> Self {
        match b {
            Backend::Auto => Self::Auto,
            Backend::Local => Self::Local,
            Backend::Remote => Self::Remote,
        }
    }
}

impl From<vox_common::remote::Backend> for Backend {
    fn from(b: vox_common::remote::Backend) -> Self {
        match b {
            vox_common::remote::Backend::Auto => Self::Auto,
            vox_common::remote::Backend::Local => Self::Local,
            vox_common::remote::Backend::Remote => Self::Remote,
        }
    }
}

glib::wrapper! {
    pub struct WhisperSttElement(ObjectSubclass<imp::WhisperStt>) @extends gst::Element, gst::Object;
}

pub fn register(plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    Backend::static_type().mark_as_plugin_api(gst::PluginAPIFlags::empty());
    gst::Element::register(
        Some(plugin),
        "whisperstt",
        gst::Rank::NONE,
        WhisperSttElement::static_type(),
    )
}
