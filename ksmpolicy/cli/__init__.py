"""The `ksmpolicy` command: one module per command family; `main` wires them together."""
