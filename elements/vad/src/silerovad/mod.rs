use gst::glib;
use gst::prelude::*;

mod imp;

/// What `silerovad` does with audio outside speech.
#[derive(Debug, Eq, PartialEq, Ord, PartialOrd, Hash, Clone, Copy, Default, glib::Enum)]
#[repr(u32)]
#[enum_type(name = "GstSileroVadMode")]
pub enum VadMode {
    /// Pass all audio through unchanged, marking speech with events.
    #[default]
    #[enum_value(name = "Pass all audio through", nick = "pass-through")]
    PassThrough = 0,
    /// Pass only speech (with padding); silence is replaced by gap events.
    #[enum_value(name = "Drop silence, pass speech only", nick = "drop-silence")]
    DropSilence = 1,
}

glib::wrapper! {
    pub struct SileroVadElement(ObjectSubclass<imp::SileroVad>) @extends gst::Element, gst::Object;
}

pub fn register(plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    VadMode::static_type().mark_as_plugin_api(gst::PluginAPIFlags::empty());
    gst::Element::register(
        Some(plugin),
        "silerovad",
        gst::Rank::NONE,
        SileroVadElement::static_type(),
    )
}
