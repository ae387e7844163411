use gst::glib;
use gst::prelude::*;

mod imp;

glib::wrapper! {
    pub struct WhisperSttElement(ObjectSubclass<imp::WhisperStt>) @extends gst::Element, gst::Object;
}

pub fn register(plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    gst::Element::register(
        Some(plugin),
        "whisperstt",
        gst::Rank::NONE,
        WhisperSttElement::static_type(),
    )
}
