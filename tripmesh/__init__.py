"""tripmesh's shared package: the generated v1 contract, the runtime and the mesh launcher.

- `tripmesh.v1`: the protobuf and gRPC code protoc generates from protos/ (build output);
- `tripmesh.runtime`: what every server shares (storage, errors, RPC plumbing, logs, failpoints);
- `tripmesh.mesh`: the mesh as `make up` runs it (layout, supervisord, Toxiproxy).
"""

from __future__ import annotations

#: The participants, in the order a trip takes its legs (a saga's steps; compensation
#: runs it backwards). Every list of participants in the code derives from this one.
PARTICIPANTS: tuple[str, ...] = ("flight", "hotel", "car")
