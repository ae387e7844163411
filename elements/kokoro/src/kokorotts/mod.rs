use gst::glib;
use gst::prelude::*;

mod imp;

glib::wrapper! {
    pub struct KokoroTtsElement(ObjectSubclass<imp::KokoroTts>) @extends gst::Element, gst::Object;
}

pub fn register(plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    gst::Element::register(
        Some(plugin),
        "kokorotts",
        gst::Rank::NONE,
        KokoroTtsElement::static_type(),
    )
}
