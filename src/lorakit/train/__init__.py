"""The training pipeline: run config, a run's data and batches, the loss, the loop, reporting.

The entry point is :func:`lorakit.train.loop.train`, exported as ``lorakit.train``
(which is that function, not this package; see :mod:`lorakit`). Everything a training
run shares with inference (reading rows, tokenizing, collating) lives outside this
package, in :mod:`lorakit.rows` and :mod:`lorakit.examples`.
"""
