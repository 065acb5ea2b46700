"""The `tripmesh` command line against a mesh as `make up` runs it.

It must find the mesh without being told its ports (from the port variables
`make up` read, or from the layout the mesh left in its data folder), print
the idempotency key it used so that a booking can be repeated safely, exit
with the documented codes, and cut, slow and heal the mesh's edges through
Toxiproxy's API.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.books import day
from tests.e2e.conftest import RunningMesh
from tests.procs import ROOT

pytestmark = pytest.mark.e2e

STORY_TRIP = ["--flight", "JL5", "--hotel", "TOKYO-GRAND", "--car", "CAMRY-NRT"]


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "coordinator.cli", *args],
        cwd=ROOT,
        env={**env, "COLUMNS": "100"},
        capture_output=True,
        check=False,
        text=True,
        timeout=60,
    )


def _state_file_only(mesh: RunningMesh) -> dict[str, str]:
    """No port variable at all: only the data folder the mesh was started in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIPMESH_")}
    return {**env, "TRIPMESH_DATA_DIR": str(mesh.data_dir)}


def test_the_cli_finds_the_mesh_prints_its_key_and_replays_it(running_mesh: RunningMesh) -> None:
    found_by = {"port variables": running_mesh.env, "layout.json": _state_file_only(running_mesh)}
    for how, env in found_by.items():
        key = f"cli-mesh-{how.replace(' ', '-').replace('.', '-')}"
        first = _cli(env, "book", "--key", key, "--date", day(9), *STORY_TRIP)
        assert first.returncode == 0, (how, first.stdout, first.stderr)
        assert f"idempotency key {key}" in first.stderr
        assert "confirmed" in first.stdout
        again = _cli(env, "--json", "book", "--key", key, "--date", day(9), *STORY_TRIP)
        assert again.returncode == 0, (how, again.stdout, again.stderr)
        reply = json.loads(again.stdout)
        assert reply["replayed"] is True
        assert reply["trip"]["idempotency_key"] == key
        # The trip's id is shown whole, even on a narrow terminal.
        shown = _cli(env, "trips", "--limit", "1")
        assert reply["trip"]["trip_id"] in shown.stdout, shown.stdout
    # Without --key the CLI invents one, and says which.
    fresh = _cli(running_mesh.env, "book", "--date", day(9), *STORY_TRIP)
    assert fresh.returncode == 0 and "idempotency key cli-" in fresh.stderr


def test_exit_codes_say_how_a_booking_ended(running_mesh: RunningMesh) -> None:
    env = running_mesh.env
    vans = ["--date", day(11), "--car", "ALPHARD-NRT", "--cars", "9", "--days", "1"]
    # Fifteen Alphard vans: nine of them once, then nine more than are left.
    first = _cli(env, "book", "--protocol", "2pc", "--flight", "JL5", *vans)
    assert first.returncode == 0, (first.stdout, first.stderr)
    refused = _cli(env, "book", "--protocol", "2pc", "--flight", "JL5", *vans)
    assert refused.returncode == 3, (refused.stdout, refused.stderr)
    assert "aborted" in refused.stdout
    bad = _cli(env, "book", "--date", day(9), "--nights", "0", *STORY_TRIP)
    assert bad.returncode == 1
    # Printed once: the code, then each bad field on its own line.
    assert bad.stdout.count("INVALID_ARGUMENT") == 1, bad.stdout
    assert bad.stdout.count("hotel.nights") == 1, bad.stdout
    usage = _cli(env, "book", "--protocol", "4pc")
    assert usage.returncode == 2


def test_fault_cuts_slows_and_heals_an_edge(running_mesh: RunningMesh) -> None:
    env = _state_file_only(running_mesh)
    edge = "car-to-coordinator"  # the car's decision queries: unused unless a hold is in doubt
    try:
        assert _cli(env, "fault", "cut", edge).returncode == 0
        slowed = _cli(env, "fault", "slow", "coordinator-to-car", "--latency", "40")
        assert slowed.returncode == 0, slowed.stderr
        listed = json.loads(_cli(env, "--json", "fault", "list").stdout)
        by_edge = {e["edge"]: e for e in listed}
        assert by_edge[edge]["enabled"] is False
        (toxic,) = by_edge["coordinator-to-car"]["toxics"]
        assert (toxic["type"], toxic["latency"]) == ("latency", 40)
        assert running_mesh.toxiproxy.proxy(edge).enabled is False  # the real server says so
        unknown = _cli(env, "fault", "cut", "nowhere-to-nothing")
        assert unknown.returncode == 1 and "unknown edge" in unknown.stderr
    finally:
        healed = _cli(env, "fault", "heal")
    assert healed.returncode == 0, healed.stderr
    proxies = running_mesh.toxiproxy.proxies()
    assert all(p.enabled and not p.toxics for p in proxies.values())


def test_operator_commands_carry_the_operators_token(running_mesh: RunningMesh) -> None:
    env = _state_file_only(running_mesh)
    booked = _cli(
        env, "--json", "book", "--key", "cli-mesh-operator", "--date", day(9), *STORY_TRIP
    )
    trip_id = json.loads(booked.stdout)["trip"]["trip_id"]
    # With the token `make up` wrote, the coordinator hears an operator: a confirmed trip
    # needs no resolving, and it says so.
    resolved = _cli(env, "resolve", trip_id, "--reason", "nothing to do")
    assert resolved.returncode == 1
    assert "FAILED_PRECONDITION" in resolved.stdout, resolved.stdout
    # With a token nobody was given, it does not listen at all.
    forged = _cli({**env, "TRIPMESH_OPERATOR_TOKEN": "forged"}, "resolve", trip_id, "--reason", "x")
    assert forged.returncode == 1
    assert "PERMISSION_DENIED" in forged.stdout, forged.stdout
