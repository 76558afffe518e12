"""Results where radiologists look: a DICOM Structured Report per scored study, and its
delivery to the hospital's PACS.

The last stage of the flow. It reads what the earlier stages left in the state
(:mod:`batchscan.results.state`: study and image rows) and, for the SR's patient and study modules,
the headers of the scored source files themselves (the state holds no patient identity);
nothing earlier in the flow imports it.

* :mod:`batchscan.pacs.sr`: one TID 1500 Measurement Report per study, conformant to IHE AI
  Results, made with highdicom, with a UID derived from what it says (so a rerun with
  nothing new writes nothing);
* :mod:`batchscan.pacs.template`: the same SR made from a template built once per model and
  run, at a fraction of highdicom's cost (what the scan's SR stage, ``pacs.write``, uses);
* :mod:`batchscan.pacs.outbox`: the ledger of an SR folder (what was written for which
  study, what was delivered where), so that nothing is sent twice and nothing is lost;
* :mod:`batchscan.pacs.send`: ``batchscan send``, C-STORE of what is not yet delivered
  (pynetdicom, optionally over DICOM TLS).

An SR is the one output of batchscan that carries the patient's identity (the PACS files
it into the patient's study by it): it is written 0640 outside the archive, and no
identifying value ever reaches a log or an error message.

May import: every part of the flow before it (storage, ingest, scoring, engines, results,
site);
highdicom and pynetdicom.
"""
