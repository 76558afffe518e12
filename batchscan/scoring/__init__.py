"""Scoring: the model, its scores, where they stand, and the store of model inputs.

* :mod:`~batchscan.scoring.model` loads a model with its card and refuses one without;
* :mod:`~batchscan.scoring.infer` scores batches of model inputs (on a GPU when there is
  one), :mod:`~batchscan.scoring.ood` says how far a film lies from the training films;
* :mod:`~batchscan.scoring.input_store` keeps the 64 x 64 input of every scored file, and
  :mod:`~batchscan.scoring.rescore` scores stored inputs again when the model or the
  training domain changes, without opening the archive.

May import: :mod:`batchscan.storage` and :mod:`batchscan.ingest` (downwards), TensorFlow/Keras,
numpy; nothing above.
"""
