"""Test-only servers and places: a real Azurite (blob service, in memory), a fault-injecting HTTP
proxy, and a small real filesystem for full-disk tests."""
