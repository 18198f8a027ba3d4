"""The schema migrations, shipped inside the agent as package `pgvpn.migrations`."""
