"""Brokers that join processes: the workers of one node (IPC), and nodes (Redis, later)."""
