"""A Dataverse Web API simulator: HTTPS on loopback, faithful enough for Microsoft's own SDK."""
