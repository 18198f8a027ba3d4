"""Errors a user can act on: the CLI prints their message, never a traceback."""


class PgvpnError(Exception):
    """Base class for errors that end a command with a clear message."""


class ConfigError(PgvpnError):
    """A setting is missing or invalid."""


class DatabaseError(PgvpnError):
    """The database is unreachable, refuses us, or has the wrong schema."""


class PrivilegeError(PgvpnError):
    """The process lacks a privilege it needs (CAP_NET_ADMIN, /dev/net/tun)."""
