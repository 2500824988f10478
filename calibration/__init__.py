"""Calibration data and activation statistics for quantizing LLaMa models.

The text the suite reads and what every quantization recipe needs from it:

* **Datasets** (:mod:`calibration.datasets`): summarization samples ``(id, article, reference)`` from aclsum,
  CNN/DailyMail or a local copy — the evaluation's test articles and the calibration's training documents.
* **Calibration tokens** (:mod:`calibration.data`): ``num_samples`` rows of ``seq_len`` real tokens cut from a
  seeded stream of training documents (ACLSum train by default, CNN/DailyMail train as TensorRT-LLM does, or a
  local file), and the calibration flags every CLI shares.
* **Activation statistics** (:mod:`calibration.stats`): for every linear of every decoder layer, under its
  TensorRT-LLM name (``layers.{i}.attention.qkv`` …), the per-input-channel max and mean of ``|x|`` and an
  outlier score (max / median channel absmax). A mixed-precision search ranks linears by that score and keeps
  the strongest outliers in FP16 (:meth:`~calibration.stats.ActivationStats.ranked_layers`).

Why the statistics are computed once and replayed: they depend only on (model bytes, calibration spec), yet a
search evaluates many candidate recipes, and each would otherwise re-run the full-precision model over the
calibration set (tens of seconds on a CPU per run, for bit-identical numbers). So :func:`~calibration.stats.get_stats`
collects them with a handful of forward hooks in one pass and stores them under
``<cache>/calib/<model hash>-<spec hash>/`` (safetensors + JSON, written atomically, checked on load); every later
run, in any process, reads the same numbers in milliseconds, which also keeps the rankings reproducible.

``python -m calibration`` prints the layers with the strongest outliers and plots them per layer type.
"""
