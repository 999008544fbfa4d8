"""billing-crm-sync: the Functions app's package."""

__version__ = "0.1.0"
