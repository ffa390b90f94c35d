"""Forge: a Redis Streams event bus turned into an ML training and embedding engine."""

__version__ = "0.1.0"
