"""Cross-domain adaptation: label-free correspondence mining between domains (``mining``) and,
later, the training losses that use the mined pairs."""
