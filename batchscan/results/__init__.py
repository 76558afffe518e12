"""Results: per study, kept between runs, written where dashboards and people look.

* :mod:`~batchscan.results.aggregate` makes one score per study from its images';
* :mod:`~batchscan.results.state` keeps every file's row between runs (the incremental,
  crash-safe state; it owns its tables, and its readers ask it by what they want),
  :mod:`~batchscan.results.keys` names what made a row, and
  :mod:`~batchscan.results.runlock` keeps two runs from one REPORT_DIR;
* :mod:`~batchscan.results.report` writes the Parquet and CSV reports atomically,
  :mod:`~batchscan.results.report_html` the page a person opens, with
  :mod:`~batchscan.results.plots` (inline SVG charts) and
  :mod:`~batchscan.results.saliency` (maps of where a score came from).

May import: :mod:`batchscan.storage`, :mod:`batchscan.ingest`, :mod:`batchscan.scoring`,
:mod:`batchscan.engines` (downwards); nothing above.
"""
