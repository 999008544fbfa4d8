"""Dataverse: a bulk client that upserts by alternate key and isolates bad rows without losing the rest."""
