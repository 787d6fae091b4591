"""Bundled tasks that are not image classification (``ormo.task`` has the protocol; image classification lives in
``ormo.experiment.problem``):

* ``ormo.tasks.stdlib_lm:StdlibLM``: a byte-level causal language model on the Python standard library's own source
  files, read from the running interpreter (no download), scored by validation loss and perplexity.
"""
