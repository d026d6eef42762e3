"""Transport security, identities, roles and the audit log (issue 6)."""
