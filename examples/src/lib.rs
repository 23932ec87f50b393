//! Examples for qhotplug.
