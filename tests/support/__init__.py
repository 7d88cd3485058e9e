"""Test-only servers and places: a real Azurite (blob service, in memory, optionally over TLS), a
fault-injecting HTTP proxy, a forward proxy, private namespaces (a small real filesystem, a
network of one's own), and this process's open connections."""
