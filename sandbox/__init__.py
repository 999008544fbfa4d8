"""Local platform for billing-crm-sync: emulators, simulators and a local Functions host (dev only)."""
