"""Storage: how batchscan puts anything on disk, below the whole flow.

Every part of the flow writes (the state, the input store, reports, models, SRs), and each
must keep the same two promises: a reader never sees half a file, and what holds patient
facts is readable by owner and group only. They are kept here, once:

* :mod:`~batchscan.storage.files` is the one way a file is written: a hidden temporary file
  in the same folder, fsync, mode, rename over the final name, fsync of the folder; whole
  (bytes or text) or streamed into a temporary that is published later;
* :mod:`~batchscan.storage.sqlite` is the one way a SQLite store is opened: WAL, a schema
  version row (with an upgrade path or a clear refusal), private files, a busy timeout,
  read-only opening. What a store does when its database cannot be used is the store's
  own policy, given as a parameter.

The stores themselves (the state, the input store, the SR outbox, the report-label cache)
each own their tables in their own module further up the flow.

May import: the standard library only (it is the bottom of the flow, below
:mod:`batchscan.ingest`); nothing of batchscan.
"""
