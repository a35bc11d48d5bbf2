"""Decorator modules: each wraps a device, is a device, and adds one feature."""
