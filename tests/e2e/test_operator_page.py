"""The operator page in a real headless Chromium, checked against the coordinator's gRPC API.

Three trips: one confirmed, one aborted, and a saga whose car is sold out and
whose hotel dies (SIGKILL, failpoint) when its compensation arrives, so that
it becomes NEEDS_ATTENTION. The page must show the same counts as ListTrips,
filter and search down to exactly that trip, and show GetTrip's timeline in
order. Then the operator acts from the page: resolving is refused (a leg still
holds units) and a wrong token is refused, both inside the confirmation and
with nothing written; once the hotel is back, a retry with the operator's
token ends the trip ABORTED with that operator in the timeline.

A second test runs the whole mesh, Toxiproxy included, at 1,000 px: nothing
overflows, and a cut edge is shown as a cut edge, not as a dead service.

The browser is Debian's chromium (`make browser` installs it), driven by
Playwright; `playwright install` is never needed. Screenshots go to tmp_path
and their paths are printed (pytest -s shows them).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from playwright.sync_api import Page

from tests.books import Books, trip_request
from tests.browser import Tab
from tests.conftest import CAPACITIES
from tests.e2e.conftest import isolated_env, start, stop_and_check
from tests.procs import Cluster, with_secrets
from tripmesh import PARTICIPANTS
from tripmesh.mesh import layout as layouts
from tripmesh.mesh.toxiproxy import Toxiproxy
from tripmesh.v1 import coordinator_pb2 as cpb

STATUSES = ("pending", "confirmed", "aborted", "needs_attention", "resolved")
OPERATOR = "ada.lovelace"
CRASH_ON_CANCEL = {"TRIPMESH_FAILPOINTS": "participant.before_cancel=crash"}
TIMELINE_JS = """rows => rows.map(r => [r.dataset.at, ...['kind', 'leg', 'detail', 'actor']
    .map(f => r.querySelector(`[data-field="${f}"]`).textContent)])"""

MakeCluster = Callable[..., tuple[Cluster, Books]]


# -- what the API says ----------------------------------------------------------
def api_counts(books: Books) -> dict[str, int]:
    """Trips per status, counted over gRPC ListTrips (every page)."""
    counts = {}
    for name in STATUSES:
        status = cpb.TripStatus.Value(f"TRIP_STATUS_{name.upper()}")
        found, token = 0, ""
        while True:
            reply = books.coordinator.ListTrips(
                cpb.ListTripsRequest(status=status, page_size=500, page_token=token), timeout=5
            )
            found += len(reply.trips)
            token = reply.next_page_token
            if not token:
                break
        counts[name] = found
    return counts


def api_timeline(trip: cpb.Trip) -> list[list[str]]:
    return [[e.at.ToJsonString(), e.kind, e.leg, e.detail, e.actor] for e in trip.events]


def api_units(books: Books, kind: str) -> tuple[int, int]:
    """(held, confirmed) over every resource of `kind`, summed from gRPC GetInventory."""
    totals = [books.totals(kind, resource_id) for resource_id in CAPACITIES[kind]]
    return sum(h for h, _ in totals), sum(c for _, c in totals)


def get_trip(books: Books, trip_id: str) -> cpb.Trip:
    return books.coordinator.GetTrip(cpb.GetTripRequest(trip_id=trip_id), timeout=5)


# -- what the page shows --------------------------------------------------------
def shown_counts(page: Page) -> dict[str, int]:
    page.wait_for_selector('[data-testid="summary"][data-state="ready"]')
    return {s: int(page.get_by_test_id(f"count-{s}").inner_text()) for s in STATUSES}


def shown_trips(page: Page, status: str = "", protocol: str = "") -> list[str]:
    """The trip ids listed, once the list has loaded for these filters (and no search:
    a list still showing the last search's rows is not this one)."""
    page.wait_for_selector(
        f'[data-testid="trips-table"][data-state="ready"]'
        f'[data-filter-status="{status}"][data-filter-protocol="{protocol}"]'
        '[data-filter-q=""][data-filter-since=""][data-filter-until=""]'
    )
    rows = page.get_by_test_id("trip-row")
    ids: list[str] = rows.evaluate_all("rows => rows.map(r => r.dataset.tripId)")
    return ids


def shown_detail(page: Page, trip_id: str, status: str) -> dict[str, Any]:
    """The detail panel, once it shows `trip_id` in `status`."""
    page.wait_for_selector(
        f'[data-testid="trip-detail"][data-trip-id="{trip_id}"][data-status="{status}"]'
    )
    legs = page.get_by_test_id("leg-row").evaluate_all(
        "rows => rows.map(r => [r.dataset.leg, r.dataset.status])"
    )
    return {
        "timeline": page.get_by_test_id("timeline-row").evaluate_all(TIMELINE_JS),
        "legs": legs,
        "decision": page.get_by_test_id("detail-decision").inner_text(),
        "failure": page.get_by_test_id("detail-failure").inner_text(),
    }


def shown_units(page: Page, kind: str) -> tuple[int, int]:
    held = page.get_by_test_id(f"held-{kind}").inner_text()
    return int(held), int(page.get_by_test_id(f"confirmed-{kind}").inner_text())


def screenshot(page: Page, path: Path) -> None:
    page.screenshot(path=str(path), full_page=True)
    print(f"\noperator page screenshot: {path}")


def assert_detail_matches(shown: dict[str, Any], trip: cpb.Trip) -> None:
    assert shown["timeline"] == api_timeline(trip)
    assert shown["legs"] == [
        [
            cpb.LegKind.Name(leg.kind).removeprefix("LEG_KIND_").lower(),
            cpb.LegStatus.Name(leg.status).removeprefix("LEG_STATUS_").lower(),
        ]
        for leg in trip.legs
    ]
    assert shown["decision"] == cpb.Decision.Name(trip.decision).removeprefix("DECISION_").lower()
    # The cause, then why the trip needs a person (a field of its own) while it does.
    attention = trip.attention_detail and f"needs attention: {trip.attention_detail}"
    assert shown["failure"] == "; ".join(filter(None, [trip.failure_reason, attention]))
    if trip.status == cpb.TRIP_STATUS_NEEDS_ATTENTION:
        assert trip.attention == cpb.ATTENTION_COMPENSATION_FAILED and attention


def book_three(cluster: Cluster, books: Books) -> tuple[str, str, str]:
    """A confirmed saga, an aborted 2PC trip, and a saga stuck in NEEDS_ATTENTION."""
    hotel = cluster.services["hotel"]
    hotel.stop()
    hotel.start(extra_env=CRASH_ON_CANCEL)
    book = books.coordinator.BookTrip
    ok = book(trip_request("ok", cpb.PROTOCOL_SAGA, flight="FX", hotel="H", car="C"), timeout=20)
    assert ok.trip.status == cpb.TRIP_STATUS_CONFIRMED, ok.trip
    no = book(
        trip_request("no", cpb.PROTOCOL_TWO_PHASE_COMMIT, flight="FX", hotel="H", car="C-SOLD-OUT"),
        timeout=20,
    )
    assert no.trip.status == cpb.TRIP_STATUS_ABORTED, no.trip
    stuck = book(
        trip_request("stuck", cpb.PROTOCOL_SAGA, flight="FX", hotel="H", car="C-SOLD-OUT"),
        timeout=20,
    ).trip.trip_id
    books.wait_trip(stuck, lambda t: t.status == cpb.TRIP_STATUS_NEEDS_ATTENTION, timeout=30)
    assert not hotel.running, "the hotel should have died on the stuck saga's Cancel"
    return ok.trip.trip_id, no.trip.trip_id, stuck


def check_overview(page: Page, books: Books, trips: list[str]) -> dict[str, int]:
    """Counts as ListTrips counts them; units as GetInventory sums them; every trip listed."""
    counts = api_counts(books)
    assert counts == {
        **dict.fromkeys(STATUSES, 0),
        "confirmed": 1,
        "aborted": 1,
        "needs_attention": 1,
    }
    assert shown_counts(page) == counts
    assert sorted(shown_trips(page)) == sorted(trips)
    page.wait_for_selector('[data-testid="service-hotel"][data-state="error"]')  # it is dead
    for kind in ("flight", "car"):
        assert shown_units(page, kind) == api_units(books, kind), kind
    return counts


def check_filters(page: Page, aborted: str, stuck: str) -> None:
    page.get_by_test_id("filter-protocol").select_option("2pc")
    assert shown_trips(page, protocol="2pc") == [aborted]
    page.get_by_test_id("filter-protocol").select_option("")
    page.get_by_test_id("filter-status").select_option("needs_attention")
    assert shown_trips(page, status="needs_attention") == [stuck]


def check_search(page: Page, books: Books, trips: dict[str, str]) -> None:
    """Find by trip id, idempotency key and customer; a time range after them finds none."""

    def search(text: str, since: str = "") -> list[str]:
        page.get_by_test_id("filter-q").fill(text)
        page.get_by_test_id("filter-since").fill(since)
        page.get_by_test_id("search").click()
        page.wait_for_selector(
            f'[data-testid="trips-table"][data-state="ready"][data-filter-q="{text}"]'
            f'[data-filter-since="{since}"]'
        )
        ids: list[str] = page.get_by_test_id("trip-row").evaluate_all(
            "rows => rows.map(r => r.dataset.tripId)"
        )
        return ids

    for key, trip_id in trips.items():
        assert search(trip_id) == [trip_id]
        assert search(key) == [trip_id]  # the idempotency key
    assert sorted(search("customer-1")) == sorted(trips.values())
    assert search("customer-1", since="2999-01-01T00:00") == []
    assert search("nobody") == []
    page.get_by_test_id("clear-search").click()
    assert sorted(shown_trips(page)) == sorted(trips.values())


def act(page: Page, action: str, reason: str, token: str) -> None:
    """Open an action's confirmation, fill it and confirm."""
    page.get_by_test_id(f"action-{action}").click()
    dialog = page.get_by_test_id("action-dialog")
    assert dialog.get_attribute("data-action") == action
    page.get_by_test_id("action-reason").fill(reason)
    page.get_by_test_id("action-token").fill(token)
    page.get_by_test_id("action-confirm").click()


def refused_in_dialog(page: Page, needle: str) -> str:
    error = page.get_by_test_id("action-error")
    error.wait_for(state="visible")
    text = error.inner_text()
    assert needle in text, text
    page.get_by_test_id("action-cancel").click()
    return text


def retry_from_the_page(
    page: Page, cluster: Cluster, books: Books, trip_id: str, token: str
) -> cpb.Trip:
    """Refused actions write nothing; then the hotel is back and the page's retry ends it."""
    before = get_trip(books, trip_id)
    act(page, "resolve", "nothing to do", token)
    refused_in_dialog(page, "409")  # the flight leg is still confirmed
    cluster.services["hotel"].start(extra_env={"TRIPMESH_FAILPOINTS": ""})
    act(page, "retry", "hotel is back", "not-the-token")
    refused_in_dialog(page, "403")
    after = get_trip(books, trip_id)
    assert (after.status, len(after.events)) == (before.status, len(before.events))

    act(page, "retry", "hotel is back", token)
    page.get_by_test_id("action-dialog").wait_for(state="hidden")
    notice = page.get_by_test_id("action-notice")
    notice.wait_for(state="visible")
    assert "aborted" in notice.inner_text()
    trip = books.wait_trip(trip_id, timeout=30)
    assert trip.status == cpb.TRIP_STATUS_ABORTED, trip
    return trip


def test_operator_page_shows_what_the_api_says(
    make_cluster: MakeCluster, tab: Tab, tmp_path: Path
) -> None:
    cluster, books = make_cluster(coordinator_args=["--compensation-give-up", "2"])
    token, _ = with_secrets(cluster, OPERATOR)  # as `make up` does
    confirmed, aborted, stuck = book_three(cluster, books)
    origin = f"http://{cluster.admin_address}/"
    page = tab.page

    page.goto(origin)
    counts = check_overview(page, books, [confirmed, aborted, stuck])
    screenshot(page, tmp_path / "1-overview.png")
    check_filters(page, aborted, stuck)
    page.get_by_test_id("filter-status").select_option("")
    check_search(page, books, {"ok": confirmed, "no": aborted, "stuck": stuck})

    # The stuck trip's story, as GetTrip tells it.
    page.locator(f'[data-testid="trip-row"][data-trip-id="{stuck}"]').click()
    shown = shown_detail(page, stuck, "needs_attention")
    assert_detail_matches(shown, get_trip(books, stuck))
    assert shown["timeline"][-1][1] == "attention"
    screenshot(page, tmp_path / "2-needs-attention.png")

    # The operator acts from the page; a reload shows the outcome and who did it.
    trip = retry_from_the_page(page, cluster, books, stuck, token)
    page.reload()
    shown = shown_detail(page, stuck, "aborted")
    assert_detail_matches(shown, trip)
    retries = [(row[3], row[4]) for row in shown["timeline"] if row[1] == "operator-retry"]
    assert retries == [("hotel is back", OPERATOR)]
    kinds = [row[1] for row in shown["timeline"]]
    assert kinds.index("attention") < kinds.index("operator-retry") < kinds.index("finished")
    page.get_by_test_id("filter-status").select_option("needs_attention")
    assert shown_trips(page, status="needs_attention") == []
    expected = {**counts, "aborted": 2, "needs_attention": 0}
    assert shown_counts(page) == api_counts(books) == expected
    for kind in ("flight", "hotel", "car"):
        page.wait_for_selector(f'[data-testid="service-{kind}"][data-state="ready"]')
        assert shown_units(page, kind) == api_units(books, kind), kind
    screenshot(page, tmp_path / "3-after-retry.png")

    # The browser logs the two refusals it was sent (409, 403) as failed loads; nothing else.
    refusals = [e for e in tab.errors if "status of 409" in e or "status of 403" in e]
    assert len(refusals) == 2 and len(tab.errors) == 2, tab.errors
    assert all(url.startswith(origin) for url in tab.requests), tab.requests


NO_OVERFLOW_JS = """() => {
  const cards = [...document.querySelectorAll('[data-testid^="service-"][data-service]')];
  const boxes = cards.map(c => c.getBoundingClientRect());
  const overlaps = [];
  boxes.forEach((a, i) => boxes.slice(i + 1).forEach((b, j) => {
    if (a.left < b.right && b.left < a.right && a.top < b.bottom && b.top < a.bottom)
      overlaps.push([cards[i].dataset.service, cards[i + 1 + j].dataset.service]);
  }));
  return {
    page: document.documentElement.scrollWidth - window.innerWidth,
    spilling: cards.filter(c => c.scrollWidth > c.clientWidth + 1).map(c => c.dataset.service),
    overlaps,
  };
}"""


def service_state(page: Page, kind: str, state: str) -> None:
    page.get_by_test_id("refresh").click()
    page.wait_for_selector(f'[data-testid="service-{kind}"][data-state="{state}"]', timeout=15_000)


def test_the_page_fits_1000px_and_tells_a_cut_edge_from_a_dead_service(
    tab: Tab, tmp_path: Path
) -> None:
    env = isolated_env()
    mesh = start(tmp_path / "mesh", env)
    try:
        lay = mesh.layout
        books = Books.open(lay.client_address, {k: lay.address(k) for k in PARTICIPANTS})
        story = {"flight": "JL5", "hotel": "TOKYO-GRAND", "car": "CAMRY-NRT"}
        request = trip_request("wide", cpb.PROTOCOL_SAGA, **story)
        trip = books.coordinator.BookTrip(request, timeout=30).trip
        assert trip.status == cpb.TRIP_STATUS_CONFIRMED
        books.close()
        page = tab.page
        page.set_viewport_size({"width": 1000, "height": 900})
        page.goto(f"http://{lay.address(layouts.admin_name('coordinator'))}/")
        for kind in PARTICIPANTS:
            page.wait_for_selector(f'[data-testid="service-{kind}"][data-state="ready"]')
        states = page.get_by_test_id("edge-row").evaluate_all(
            "rows => rows.map(r => [r.dataset.edge, r.dataset.state])"
        )
        assert sorted(states) == sorted([p.name, "ok"] for p in lay.proxies)
        fit = page.evaluate(NO_OVERFLOW_JS)
        screenshot(page, tmp_path / "1000px.png")
        assert fit == {"page": 0, "spilling": [], "overlaps": []}, fit

        toxiproxy = Toxiproxy(lay.host, lay.ports[layouts.TOXIPROXY])
        with toxiproxy.disabled("coordinator-to-hotel"):
            # Cut edge, live service: figures read directly, the edge named, amber not red.
            service_state(page, "hotel", "edge-down")
            note = page.get_by_test_id("service-edge-hotel").inner_text()
            assert "coordinator-to-hotel" in note, note
            edge = page.locator('[data-testid="edge-row"][data-edge="coordinator-to-hotel"]')
            assert edge.get_attribute("data-state") == "cut"
            held, confirmed = shown_units(page, "hotel")
            # The booked trip's room-nights, read from the hotel directly.
            assert (held, confirmed) == (0, request.hotel.nights * request.hotel.rooms)
            for kind in ("flight", "car"):
                assert page.get_by_test_id(f"service-{kind}").get_attribute("data-state") == "ready"
            screenshot(page, tmp_path / "edge-cut.png")
            # And a service that is down whatever the road: red.
            hotel = mesh.pids()["hotel"]
            os.kill(hotel, signal.SIGSTOP)
            try:
                service_state(page, "hotel", "error")
            finally:
                os.kill(hotel, signal.SIGCONT)
        service_state(page, "hotel", "ready")
        assert not tab.errors, tab.errors
    finally:
        stop_and_check(mesh, env)
