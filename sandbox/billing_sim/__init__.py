"""A billing platform simulator: a real HTTP server on loopback that misbehaves like the real platform."""
