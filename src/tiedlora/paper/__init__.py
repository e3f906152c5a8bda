"""The paper's reproduction: its recipes per task (`configs/<task>.yaml`, which `tiedlora train
--task` starts from), the sweep of its grid (`sweep`), and the report of its tables and figures
with confidence intervals (`report`, `intervals`). The tier above training and evaluation: it
runs them, nothing below imports it."""
