"""Tests of ksmpolicy/control/."""
