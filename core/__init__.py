"""Shared plumbing every package may import: errors and checks, atomic writes, the lock."""
