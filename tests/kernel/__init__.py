"""Tests of ksmpolicy/kernel/."""
