"""Backends turn an optimized IR graph into something that runs it."""
