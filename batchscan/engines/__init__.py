"""Engines: the per-file stages on every core of one machine, or on a Ray cluster.

* :mod:`~batchscan.engines.pipeline` is the scan's options (:class:`ScanConfig`) and the
  local engine: discovery streamed into crash-isolated decode processes
  (:mod:`~batchscan.engines.workers`), their model inputs batched into the scorer;
* :mod:`~batchscan.engines.ray_engine` runs the same stage functions as Ray Data tasks, with
  token authentication and a driver that survives losing a node.

May import: :mod:`batchscan.storage`, :mod:`batchscan.ingest` and :mod:`batchscan.scoring`
(downwards); nothing above.
"""
