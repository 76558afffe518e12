"""The site's loop: labels from the radiology reports, the model measured, watched and
adapted on the hospital's own studies.

* :mod:`~batchscan.site.report_labels` (rules in ``report_rules.toml``) turns reports into
  labels (``batchscan labels``); :mod:`~batchscan.site.monitoring` measures the model against
  them per period during every scan (``--reports-file``), keeping the labels of the reports
  seen so far in :mod:`~batchscan.site.label_cache`, and
  :mod:`~batchscan.site.drift` compares each period's films (header facts, stored inputs,
  features, scores) with a reference, without reports;
* :mod:`~batchscan.site.evaluate` measures a scan's scores on the site's labels, with
  :mod:`~batchscan.site.metrics` (AUC, bootstrap intervals, calibration);
* :mod:`~batchscan.site.training` trains, calibrates and writes a model and its card;
  :mod:`~batchscan.site.site_training` is ``batchscan train``,
  :mod:`~batchscan.site.adapt` is ``batchscan adapt`` (from a scan and its reports to a
  deploy verdict), :mod:`~batchscan.site.pretrain` learns from the unlabelled films.

May import: every subpackage below it (storage, ingest, scoring, engines, results); nothing of
:mod:`batchscan.pacs`.
"""
