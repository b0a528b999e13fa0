"""``gemma4-harness report``: one self-contained HTML page and a Markdown summary of parity and goldens.

* :mod:`~harness.report.layouts`: the parallel layouts (rows) a report runs; append to add TP/CP/EP rows.
* :mod:`~harness.report.collect`: runs parity per preset x dtype x layout and the goldens check.
* :mod:`~harness.report.plots`: matplotlib figures (error per layer, per token position, layout equivalence,
  drift from the goldens) as PNG bytes.
* :mod:`~harness.report.render`: HTML, Markdown and JUnit XML.
"""
