"""Tests of ksmpolicy/libvirt/."""
