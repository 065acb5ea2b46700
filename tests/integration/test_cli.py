"""The `tripmesh` command line, run as a real subprocess against real servers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.books import day
from tests.procs import ROOT


def _cli(cluster, *args: str) -> subprocess.CompletedProcess[str]:
    env_addresses = {
        f"TRIPMESH_{kind.upper()}_SERVICE": proc.address for kind, proc in cluster.services.items()
    }
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "coordinator.cli",
            "--coordinator",
            cluster.coordinator.address,
            *args,
        ],
        cwd=ROOT,
        # Its own data folder: nothing read from a mesh `make up` left in the repo.
        env={
            **os.environ,
            **env_addresses,
            "TRIPMESH_DATA_DIR": str(cluster.data_dir),
            "COLUMNS": "200",
        },
        capture_output=True,
        check=False,
        text=True,
        timeout=60,
    )


def test_cli_books_shows_and_lists_a_trip(make_cluster) -> None:
    cluster, _ = make_cluster()
    common = ["--date", day(3), "--flight", "FX", "--hotel", "H", "--car", "C"]
    booked = _cli(cluster, "--json", "book", "--protocol", "2pc", "--key", "cli-1", *common)
    assert booked.returncode == 0, booked.stderr
    trip = json.loads(booked.stdout)["trip"]
    assert trip["status"] == "TRIP_STATUS_CONFIRMED"

    shown = _cli(cluster, "trip", trip["trip_id"])
    assert shown.returncode == 0, shown.stderr
    assert "confirmed" in shown.stdout and trip["trip_id"] in shown.stdout
    # The timeline, oldest first: the vote and decision come before the acknowledgements.
    assert "timeline" in shown.stdout
    assert shown.stdout.index("decision") < shown.stdout.index("acknowledged")

    listed = _cli(cluster, "--json", "trips", "--status", "confirmed")
    assert [t["trip_id"] for t in json.loads(listed.stdout)["trips"]] == [trip["trip_id"]]
    # Found by customer, key and time; and not by another of each.
    for flags, expected in (
        (["--customer", "cli-user"], [trip["trip_id"]]),
        (["--customer", "someone-else"], []),
        (["--key", "cli-1"], [trip["trip_id"]]),
        (["--key", "cli-2"], []),
        (["--since", "1h"], [trip["trip_id"]]),
        (["--since", "2999-01-01T00:00"], []),
    ):
        found = _cli(cluster, "--json", "trips", *flags)
        assert found.returncode == 0, found.stderr
        trips = json.loads(found.stdout).get("trips", [])
        assert [t["trip_id"] for t in trips] == expected, flags
    wrong = _cli(cluster, "trips", "--since", "yesterday")
    assert wrong.returncode == 2 and "--since" in wrong.stderr

    inventory = _cli(
        cluster, "--json", "inventory", "flight", "FX", "--from", day(3), "--to", day(3)
    )
    (row,) = json.loads(inventory.stdout)["days"]
    assert row["confirmed"] == 1 and row["available"] == row["capacity"] - 1


def test_cli_names_the_bad_field(make_cluster) -> None:
    cluster, _ = make_cluster()
    bad = _cli(
        cluster,
        "book",
        "--date",
        day(3),
        "--flight",
        "FX",
        "--hotel",
        "H",
        "--car",
        "C",
        "--nights",
        "0",
    )
    assert bad.returncode == 1
    assert "INVALID_ARGUMENT" in bad.stdout
    assert "hotel.nights" in bad.stdout
