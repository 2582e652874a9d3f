"""Knowledge distillation: the CIFAR/ImageNet model zoo of the CRD testbed (``zoo``) and the
distillation losses behind one interface (``losses``: KD, CRD, DCD, RRD).

Importing this package is cheap: torch is imported by the submodules that need it.
"""
