"""The sweep's rules and records, pure: no Ray here (the Ray side is :mod:`geopose_ray.cluster`)."""
