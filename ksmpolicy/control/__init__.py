"""Pacing ksmd: the pure control law, the daemon loop, hook notes, systemd notify."""
