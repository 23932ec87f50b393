//! Test harness for qhotplug.
