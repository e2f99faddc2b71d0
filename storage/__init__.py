"""Persistence: the Store protocol and its Redis and embedded backends."""
