"""pgvpn: a VPN whose only transport is PostgreSQL; every packet is a logged row."""

__version__ = "0.1.0"
