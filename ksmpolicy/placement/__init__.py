"""Placement by sharing: sketches of what each VM's memory holds (sketch.py), comparable between
hosts, and the predictions made from them: where a VM would share the most with VMs it may
share with (`place`), and which migrations would save the most (`rebalance`) (plan.py)."""
