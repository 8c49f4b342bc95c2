"""libvirt: domain XML facts and rewrite, image identity, the host side, and the qemu hook."""
