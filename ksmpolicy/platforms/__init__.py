"""The platform interface: what each way of running VMs (libvirt, Proxmox VE, plain processes)
answers for the parts above it: who a running VM is, its facts, the commands that fix it, and
the live switch of its guest RAM."""
