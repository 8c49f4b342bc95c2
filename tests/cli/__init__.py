"""Tests of ksmpolicy/cli/."""
