"""What the coordinator and the participants share: storage, errors, gRPC plumbing, failpoints."""
