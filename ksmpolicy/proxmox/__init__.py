"""Proxmox VE: config facts and rewrite, the node side (qm, storages, hookscript), the hook."""
