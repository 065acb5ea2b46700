"""Load tests (Locust, `make load`) and the 2PC-against-saga benchmark (`make bench`).

- `trips`: what the load books: routes of the built-in catalog, the seeded
  mix of hot, spread-out and doomed trips, and catalogs with room for a long run.
- `locustfile`: the Locust gRPC user and the `steady` / `black-friday` shapes.
- `run`: `make load` and `make load-ui`: Locust against a running mesh or an isolated one.
- `bench`: `make bench`: the echo ceiling, trips/s and latency per protocol, memory, contention.
"""
