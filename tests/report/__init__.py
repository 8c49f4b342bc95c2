"""Tests of ksmpolicy/report/."""
