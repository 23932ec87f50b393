//! Host side of QEMU NICs (work in progress).
