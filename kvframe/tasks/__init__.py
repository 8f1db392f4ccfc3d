"""Synthetic evaluation tasks (e.g. passkey retrieval) for KV-cache compression."""
