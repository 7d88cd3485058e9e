"""Test-only servers: a real Azurite (blob service, in memory) and a fault-injecting HTTP proxy."""
