"""The mesh as `make up` runs it: its processes and ports, supervisord, and Toxiproxy.

- `layout`: the one declaration of the mesh's processes (processes.json), the
  proxies derived from it, and the ports actually used;
- `supervise`: supervisord's config and a client for its control socket;
- `toxiproxy`: the one door to the Toxiproxy server;
- `mesh`: `Mesh`, one mesh started, checked and stopped;
- `python -m tripmesh.mesh up|down|status|logs|reset`: its command line.

The chaos lab, the load tests and the tests start meshes through this package;
none of them needs the others for it.
"""
