"""Malicious and malformed inputs, written at test time (no binary fixtures are committed)."""
