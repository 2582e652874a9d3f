"""Self-supervised pretraining, a plug-in of the training engine (``plugin``: its ``METHODS`` and
the ``aug`` config section): MoCo v2 (``moco``), SynCo (``synco``, ``synthetic``), ISD (``isd``),
their heads, augmentations and data, and the run (``trainer``)."""
