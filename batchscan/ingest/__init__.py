"""Ingest: from a file in the archive to the 64 x 64 model input, or to a reason why not.

The first stages of the flow, run per file in the decode processes (or on Ray workers):

* :mod:`~batchscan.ingest.discover` walks the archive (never following links, never
  writing); :mod:`~batchscan.ingest.paths` names a file safely whatever bytes its name has;
* :mod:`~batchscan.ingest.header` reads a header and filters (chest radiograph? which
  view?), :mod:`~batchscan.ingest.domain` judges it against the model card's training
  domain;
* :mod:`~batchscan.ingest.dicom` with the codec plugins of :mod:`~batchscan.ingest.decoders`
  decodes and normalizes the pixels (reduced resolution where a codec allows,
  :mod:`~batchscan.ingest.sampling` says what such samples are);
* :mod:`~batchscan.ingest.preprocess` is the one preprocessing function of training, local
  fine-tuning and inference, and :mod:`~batchscan.ingest.sanity` the blank-image gate.

Every outcome is a value on an :class:`~batchscan.ingest.records.ImageRecord` (status and
reason), never an exception that escapes a stage.

A PACS takes the place of the folder through :mod:`~batchscan.ingest.sources`: a query finds
the instances (as discovery finds files) and a fetch gives each one's bytes, which the same
stages read as they read a file.

May import: the standard library, numpy, pydicom, Pillow, imagecodecs,
``batchscan.__version__`` and :mod:`batchscan.storage` (below the flow); for the PACS
sources also requests, dicomweb-client and pynetdicom; nothing else of batchscan (it is the
first part of the flow).
"""
