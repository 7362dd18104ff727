"""Reusable test helpers: a test CA, TLS/plain origin servers, a fake DNS server, the gateway as a subprocess."""
