"""pdmesh on a Ray cluster: `pdmesh ray up|status|down` (launch.py) start the router replicas and the workers as
named, detached actors (actors.py); the routers follow the workers through Ray (services/router/discovery_ray.py)
and mirror their metrics into Ray's (bridge.py). Importing this package imports neither ray nor torch."""
