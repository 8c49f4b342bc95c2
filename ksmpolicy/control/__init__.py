"""Pacing ksmd and keeping trust domains: the pure control law, the daemon loop, the keeper,
systemd notify."""
