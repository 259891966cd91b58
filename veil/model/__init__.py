"""The cloaked-decoder maths shared by the core, the edge-held layers and the privacy audit."""
