"""Reference outputs, parity metrics and the CI gate: not built yet."""
