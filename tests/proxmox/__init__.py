"""Tests of ksmpolicy/proxmox/."""
