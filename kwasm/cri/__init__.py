"""iSulad and crictl integration: daemon.json editing, crictl pod/container configs, RuntimeClass
manifests, ``kwasm run --engine isulad`` and ``kwasm doctor`` (see docs/isulad.md)."""
