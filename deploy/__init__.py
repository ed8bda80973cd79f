"""Deployment tooling: credentials (CA, SuperLink certificate, node keys) and process helpers."""
