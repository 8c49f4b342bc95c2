"""Tests of ksmpolicy/policy/."""
