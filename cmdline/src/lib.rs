//! The QEMU device model and launcher (work in progress).
