"""Integration: the owner's routing table through `pgvpn db add-peer/set-routes` and
`pgvpn show`, against a lab's real Postgres (sql/011_routes.sql)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from pgvpn.errors import PgvpnError
from pgvpn.routes import Routes, route_prefix, tunnel_address
from tests.conftest import LabHandle

PEERS = ("route-c", "route-d", "route-e")


@pytest.fixture
def owner(netns_lab: LabHandle, tmp_path: Path) -> Iterator[LabHandle]:
    """The lab, with this test's peers removed before and after (as a superuser: the
    owner has no way to drop a role)."""
    def clean() -> None:
        netns_lab.sql("DELETE FROM pgvpn.peers WHERE name = ANY(%s)", [list(PEERS)],
                      superuser=True)
        for peer in PEERS:
            netns_lab.sql(f"DROP ROLE IF EXISTS pgvpn_{peer.replace('-', '_')}",
                          superuser=True)
    clean()
    (tmp_path / "pw").write_text("a-password-long-enough-for-a-peer\n")
    try:
        yield netns_lab
    finally:
        clean()


def routes_shown(lab: LabHandle) -> dict[str, list[str]]:
    lines = lab.pgvpn("show", "--json").stdout.decode().splitlines()  # one peer a line
    return {peer["name"]: peer["routes"] for peer in map(json.loads, lines)}


def refused(lab: LabHandle, *args: str) -> str:
    done = lab.pgvpn(*args, check=False)
    assert done.returncode == 2, done
    stderr = done.stderr.decode()
    assert "Traceback" not in stderr
    return stderr


def test_routes_are_added_replaced_and_shown(owner: LabHandle, tmp_path: Path) -> None:
    pw = str(tmp_path / "pw")
    owner.pgvpn("db", "add-peer", "route-c", "--password-file", pw, "--address",
                "10.240.0.3/24", "--address", "fd00:240::3/64", "--route", "192.168.240.0/24")
    owner.pgvpn("db", "add-peer", "route-d", "--password-file", pw,
                "--address", "10.240.0.4/24")
    # add-peer again with the same routes changes nothing; a new subnet adds to them
    owner.pgvpn("db", "add-peer", "route-d", "--password-file", pw, "--address",
                "10.240.0.4/24", "--route", "192.168.241.0/24")
    shown = routes_shown(owner)
    assert shown["route-c"] == ["10.240.0.3/32", "fd00:240::3/128", "192.168.240.0/24"]
    assert shown["route-d"] == ["10.240.0.4/32", "192.168.241.0/24"]
    assert owner.sql("SELECT address::text FROM pgvpn.routes WHERE peer = 'route-c' "
                     "AND address IS NOT NULL ORDER BY 1") == [("10.240.0.3/24",),
                                                               ("fd00:240::3/64",)]
    owner.pgvpn("db", "set-routes", "route-d", "--address", "10.240.0.4/24",
                "--route", "192.168.242.0/24")
    assert routes_shown(owner)["route-d"] == ["10.240.0.4/32", "192.168.242.0/24"]
    table = owner.pgvpn("show").stdout.decode()
    assert "10.240.0.3/32, fd00:240::3/128, 192.168.240.0/24" in table
    owner.pgvpn("db", "set-routes", "route-d", "--none")
    assert routes_shown(owner)["route-d"] == []


def test_overlapping_routes_are_refused_and_change_nothing(owner: LabHandle,
                                                           tmp_path: Path) -> None:
    pw = str(tmp_path / "pw")
    owner.pgvpn("db", "add-peer", "route-c", "--password-file", pw, "--address",
                "10.240.0.3/24", "--route", "192.168.240.0/24")
    owner.pgvpn("db", "add-peer", "route-d", "--password-file", pw,
                "--address", "10.240.0.4/24")
    # a new peer whose route overlaps: neither its role nor any route of it is made
    said = refused(owner, "db", "add-peer", "route-e", "--password-file", pw,
                   "--address", "10.240.0.5/24", "--route", "192.168.0.0/16")
    assert "192.168.0.0/16 of route-e overlaps 192.168.240.0/24, routed by route-c" in said
    assert owner.sql("SELECT count(*) FROM pg_roles WHERE rolname = 'pgvpn_route_e'"
                     ) == [(0,)]
    assert "route-e" not in routes_shown(owner)
    # another peer's address
    said = refused(owner, "db", "add-peer", "route-d", "--password-file", pw,
                   "--route", "10.240.0.3/32")
    assert "10.240.0.3/32 of route-d is routed by route-c" in said
    # set-routes is one transaction: refused, the old routes stay
    said = refused(owner, "db", "set-routes", "route-d", "--address", "10.240.0.4/24",
                   "--route", "192.168.240.128/25")
    assert "overlaps 192.168.240.0/24, routed by route-c" in said
    assert routes_shown(owner)["route-d"] == ["10.240.0.4/32"]
    # a second address of a family, and an address changed by add-peer
    said = refused(owner, "db", "add-peer", "route-d", "--password-file", pw,
                   "--address", "10.240.0.9/24")
    assert "has a tunnel address of that family already" in said
    said = refused(owner, "db", "add-peer", "route-d", "--password-file", pw,
                   "--address", "10.240.0.4/16")
    assert "has the tunnel address 10.240.0.4/24 already" in said
    said = refused(owner, "db", "set-routes", "route-x", "--none")
    assert "no peer route-x" in said


def test_bad_route_arguments_are_refused_before_connecting(owner: LabHandle,
                                                           tmp_path: Path) -> None:
    pw = str(tmp_path / "pw")
    for args, message in (
            (["--route", "192.168.240.1/24"], "has host bits set: did you mean "
                                              "192.168.240.0/24?"),
            (["--route", "192.168.240"], "is no IP prefix"),
            (["--address", "10.240.0.0/24"], "network or broadcast address"),
            (["--address", "224.0.0.1/24"], "not an address a peer can have"),
            (["--address", "10.240.0.3/24", "--address", "10.240.0.5/24"],
             "at most one IPv4 and one IPv6"),
            (["--address", "10.240.0.3/24", "--route", "10.240.0.0/24"], "overlap")):
        said = refused(owner, "db", "add-peer", "route-e", "--password-file", pw, *args)
        assert message in said, (args, said)
    said = refused(owner, "db", "set-routes", "route-e")
    assert "or --none" in said
    assert owner.sql("SELECT count(*) FROM pg_roles WHERE rolname = 'pgvpn_route_e'"
                     ) == [(0,)]


def test_route_parsing() -> None:
    assert str(tunnel_address("10.230.0.3")) == "10.230.0.3/32"
    assert str(route_prefix("fd00:1::/64")) == "fd00:1::/64"
    routes = Routes((tunnel_address("10.230.0.3/24"),), (route_prefix("192.168.50.0/24"),))
    assert routes.rows("peer-c") == [("peer-c", "10.230.0.3/32", "10.230.0.3/24"),
                                     ("peer-c", "192.168.50.0/24", None)]
    with pytest.raises(PgvpnError, match="overlap"):
        Routes((), (route_prefix("10.0.0.0/8"), route_prefix("10.1.0.0/16")))
