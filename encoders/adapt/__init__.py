"""Cross-domain adaptation, a plug-in of the training engine (``plugin``: its ``METHODS``):
label-free correspondence mining between domains (``mining``, ``groups``), the methods that use
it (``xdomain``, ``ucdir``) and the run (``trainer``)."""
