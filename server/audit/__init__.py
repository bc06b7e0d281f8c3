"""The Audit service's domain core: a tamper-evident, append-only Merkle log (no I/O)."""
