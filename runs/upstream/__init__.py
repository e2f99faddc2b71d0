"""Adapters that stream a model turn from an upstream provider."""
