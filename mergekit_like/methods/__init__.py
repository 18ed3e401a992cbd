"""Merge methods: one file per method, pure tensor kernels, one registry."""
