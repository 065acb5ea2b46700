"""The coordinator: runs a trip by 2PC or saga, logs before it acts, recovers after a crash."""
