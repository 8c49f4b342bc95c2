"""What KSM does for each VM: status with findings, and Prometheus metrics."""
