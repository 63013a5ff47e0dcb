"""This machine's side of a session: the background helpers (daemon, tunnel), the record of a live
session (record), the ledger of what sessions cost (ledger), the user's config file (config).
Imports paths, errors, clouds, sizing and host."""
