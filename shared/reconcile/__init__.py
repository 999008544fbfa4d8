"""Reconcile: the CRM read and compared with billing, findings recorded and reported, the healable healed."""
