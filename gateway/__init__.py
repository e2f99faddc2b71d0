"""HTTP surface of the gateway: app factory, routes, SSE, errors, config, CLI."""
