"""Benchmarks of the gateway against the direct upstream (and LiteLLM when installed): `python -m bench`."""
