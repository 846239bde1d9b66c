"""Transport security and caller identity: certificates (`certs`), TLS credentials, identities,
roles and the audit trail (docs/design.md §13)."""
