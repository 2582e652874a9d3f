"""Knowledge distillation, a plug-in of the training engine (``plugin``: its ``METHODS`` and the
``distill`` config section): the distillation losses behind one interface (``losses``: KD, CRD,
DCD, RRD), the student modules (``student``), the data (``data``) and the runs (``trainer``).
The models come from the zoo (``encoders.zoo``).

Importing this package is cheap: torch is imported by the submodules that need it.
"""
