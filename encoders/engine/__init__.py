"""The training engine: the loop that every trainer of this project runs (``run.Run`` and its
hooks), the run config (``config``), the optimiser and schedule (``optim``), checkpoints
(``checkpoint``) and the parts the methods share (``parts``).

Importing this package is cheap: torch is imported by the submodules that need it.
"""
