"""What the hooks, the daemon and the reports share in the run directory: the daemon's notify
socket and its sign of life."""
