"""The billing platform: its records, and a client that turns a misbehaving API into complete, latest data."""
