"""Providers: devices that hold data (memory, a file, a copy-on-write overlay)."""
