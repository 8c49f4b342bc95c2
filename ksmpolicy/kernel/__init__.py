"""The kernel: KSM in sysfs, processes in /proc, and QEMU's live merge toggle over QMP."""
