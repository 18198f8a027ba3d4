"""The pgvpn lab: a postgres host and two peers, on Docker or as network namespaces."""
