//! Hot-plug disks and NICs into running QEMU guests (work in progress).
