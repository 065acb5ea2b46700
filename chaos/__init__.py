"""The chaos harness: the mesh behind Toxiproxy, and the faults we inject into it."""
