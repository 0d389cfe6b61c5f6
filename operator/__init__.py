"""coserve's Kubernetes operator (kopf). Import it only as `coserve.operator`: the folder name would shadow the
standard library's `operator` module."""
